"""A synthetic KITTI-style dataset: drawn road scenes with exact labels, for demos and tests.

``make_demo_dataset(out_dir)`` writes ``out_dir/images/demo_NNNNNN.{png,jpg}`` (1242x375, like
KITTI) and ``out_dir/labels/demo_NNNNNN.txt`` (KITTI's 15 fields a line). The scenes are drawn
with Pillow through a pinhole camera with KITTI's focal length and mounting height: a road with
lane markings in perspective, sidewalks, facades and trees, and vehicles (cars, vans, trucks as
shaded 3D boxes with windows, lights and wheels), pedestrians and cyclists sized by distance.
Labels are the projections of the drawn objects, so they are exact; ``truncated`` and
``occluded`` are measured, and 3D fields (size, location, ``ry``, ``alpha``) are consistent.

Fixed cases, so every run exercises them (when ``n_images`` reaches them):
``demo_000001`` has no objects (an empty label file), ``demo_000002`` has no label file,
``demo_000003`` has a ``DontCare`` region (a cluster of distant cars), ``demo_000004`` is a dusk
scene. Every fourth image from ``demo_000002`` on is a JPEG. Same ``seed``, same bytes.

>>> from pathlib import Path; import tempfile
>>> images, labels = make_demo_dataset(Path(tempfile.mkdtemp()), n_images=2)
>>> sorted(p.name for p in images.iterdir())
['demo_000000.png', 'demo_000001.png']
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

WIDTH, HEIGHT = 1242, 375
FOCAL = 721.5            # KITTI camera 2, pixels
CX, CY = WIDTH / 2, 172.8
CAM_HEIGHT = 1.65        # metres above the road
SUPERSAMPLE = 2          # drawn at 2x and shrunk: smooth edges

NO_OBJECTS_INDEX = 1
MISSING_LABEL_INDEX = 2
DONTCARE_INDEX = 3
DUSK_INDEX = 4

LANE_W = 3.5
ROAD_EDGE = 5.25         # edge lines; parking strips to PARK_EDGE
PARK_EDGE = 7.2
WALK_EDGE = 10.5

Color = tuple[int, int, int]

VEHICLE_COLORS: dict[str, Color] = {
    "white": (236, 236, 232), "silver": (152, 156, 162), "gray": (98, 100, 104),
    "black": (26, 26, 30), "red": (186, 26, 30), "blue": (28, 62, 158), "green": (32, 112, 58),
    "yellow": (232, 192, 34), "orange": (224, 112, 24), "brown": (104, 68, 42),
}
_VEHICLE_WEIGHTS = {"white": 22, "silver": 17, "gray": 11, "black": 17, "red": 11, "blue": 10,
                    "green": 4, "yellow": 3, "orange": 3, "brown": 2}
SHIRT_COLORS: dict[str, Color] = {
    "white": (232, 232, 228), "red": (190, 30, 36), "blue": (36, 74, 170), "green": (40, 130, 60),
    "yellow": (236, 200, 40), "black": (28, 28, 30), "gray": (112, 112, 116), "orange": (230, 118, 30),
}
PANTS: tuple[Color, ...] = ((38, 44, 72), (30, 30, 32), (92, 92, 98), (104, 80, 56))
SKIN: tuple[Color, ...] = ((226, 178, 146), (192, 140, 104), (132, 92, 64))
GLASS: Color = (36, 46, 60)
TYRE: Color = (22, 22, 24)
FACADES: tuple[Color, ...] = ((214, 200, 170), (190, 170, 150), (226, 222, 210), (170, 150, 130),
                              (200, 186, 196), (180, 196, 200))


@dataclass
class DemoObject:
    """One labelled object: what was drawn, where, and its KITTI fields."""

    kind: str                          # KITTI type
    color: str                         # body color (vehicles) or shirt color (people)
    x: float                           # lateral centre, metres (camera frame, right positive)
    z: float                           # depth of the 3D box centre, metres
    h: float
    w: float
    l: float  # noqa: E741 - KITTI's name
    ry: float
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)   # clipped, pixels
    truncated: float = 0.0
    occluded: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def toward(self) -> bool:
        """Facing the camera (oncoming traffic): we see its front."""
        return self.ry > 0

    @property
    def alpha(self) -> float:
        a = self.ry - math.atan2(self.x, self.z)
        return (a + math.pi) % (2 * math.pi) - math.pi

    def kitti_line(self) -> str:
        x1, y1, x2, y2 = self.bbox
        return (f"{self.kind} {self.truncated:.2f} {self.occluded:d} {self.alpha:.2f} "
                f"{x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} {self.h:.2f} {self.w:.2f} {self.l:.2f} "
                f"{self.x:.2f} {CAM_HEIGHT:.2f} {self.z:.2f} {self.ry:.2f}")


@dataclass
class Scene:
    """Everything one image needs: objects, lighting, background choices, DontCare boxes."""

    index: int
    objects: list[DemoObject]
    dontcare: list[tuple[float, float, float, float]]
    crowd: list[DemoObject]            # the distant cars under a DontCare box (drawn, unlabelled)
    brightness: float
    overcast: bool
    dusk: bool
    seed: int

    @property
    def stem(self) -> str:
        return f"demo_{self.index:06d}"

    @property
    def suffix(self) -> str:
        return ".jpg" if self.index >= MISSING_LABEL_INDEX and (self.index - MISSING_LABEL_INDEX) % 4 == 0 \
            else ".png"

    def label_text(self) -> str:
        lines = [o.kitti_line() for o in self.objects]
        for b in self.dontcare:
            box = f"{b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}"
            lines.append(f"DontCare -1 -1 -10 {box} -1 -1 -1 -1000 -1000 -1000 -10")
        return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- camera


def project(x: float, y: float, z: float) -> tuple[float, float]:
    """A point in the camera frame (y down, metres; the road is at y = CAM_HEIGHT) -> pixels."""
    return CX + FOCAL * x / z, CY + FOCAL * y / z


def _box_extent(o: DemoObject) -> tuple[float, float, float, float]:
    """The unclipped pixel box of an object."""
    if o.kind in ("Pedestrian", "Cyclist"):
        u, v = project(o.x, CAM_HEIGHT, o.z)
        hp = FOCAL * o.h / o.z
        half = hp * (0.21 if o.kind == "Pedestrian" else 0.17)
        return (u - half, v - hp, u + half, v)
    us, vs = [], []
    for x in (o.x - o.w / 2, o.x + o.w / 2):
        for z in (o.z - o.l / 2, o.z + o.l / 2):
            for y in (CAM_HEIGHT, CAM_HEIGHT - o.h):
                u, v = project(x, y, z)
                us.append(u)
                vs.append(v)
    return (min(us), min(vs), max(us), max(vs))


def _area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _clip(b: Sequence[float]) -> tuple[float, float, float, float]:
    return (min(max(b[0], 0.0), WIDTH - 1.0), min(max(b[1], 0.0), HEIGHT - 1.0),
            min(max(b[2], 0.0), WIDTH - 1.0), min(max(b[3], 0.0), HEIGHT - 1.0))


# --------------------------------------------------------------------------- planning


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _vehicle(rng: random.Random, kind: str) -> DemoObject:
    if kind == "Car":
        h, w, l = rng.uniform(1.4, 1.6), rng.uniform(1.65, 1.85), rng.uniform(3.9, 4.6)  # noqa: E741
    elif kind == "Van":
        h, w, l = rng.uniform(2.0, 2.35), rng.uniform(1.9, 2.05), rng.uniform(4.8, 5.4)  # noqa: E741
    else:
        h, w, l = rng.uniform(3.0, 3.6), rng.uniform(2.4, 2.55), rng.uniform(7.0, 9.0)  # noqa: E741
    slot = rng.choices(["left", "center", "right", "park_left", "park_right"], weights=[3, 3, 3, 2, 2])[0]
    lane = {"left": -LANE_W, "center": 0.0, "right": LANE_W, "park_left": -6.3, "park_right": 6.3}[slot]
    if kind == "Truck" and slot.startswith("park"):
        lane = math.copysign(LANE_W, lane)
    x = lane + rng.uniform(-0.3, 0.3)
    z_min = 12.0 if slot == "center" else 7.5
    z = z_min + (52.0 - z_min) * rng.random() ** 1.4 + l / 2   # more near than far, like KITTI
    toward = slot == "left" or (slot == "park_left" and rng.random() < 0.5)
    ry = math.pi / 2 if toward else -math.pi / 2
    color = _pick(rng, _VEHICLE_WEIGHTS)
    return DemoObject(kind, color, round(x, 2), round(z, 2), round(h, 2), round(w, 2), round(l, 2),
                      round(ry + rng.uniform(-0.03, 0.03), 2))


def _person(rng: random.Random, kind: str) -> DemoObject:
    if kind == "Pedestrian":
        side = rng.choice((-1, 1))
        x = side * rng.uniform(PARK_EDGE + 0.6, WALK_EDGE - 0.4)
        if rng.random() < 0.2:
            x = rng.uniform(-ROAD_EDGE + 1, ROAD_EDGE - 1)       # crossing the road
        z = rng.uniform(7.0, 38.0)
        h, w, l = rng.uniform(1.6, 1.9), rng.uniform(0.5, 0.7), rng.uniform(0.6, 1.0)  # noqa: E741
        ry = rng.choice((-1, 1)) * rng.uniform(0.0, math.pi)
    else:
        side = rng.choice((-1, 1))
        x = side * rng.uniform(ROAD_EDGE - 0.7, ROAD_EDGE + 0.6)
        z = rng.uniform(9.0, 40.0)
        h, w, l = rng.uniform(1.7, 1.85), 0.6, 1.75  # noqa: E741
        ry = math.pi / 2 if side < 0 else -math.pi / 2
    color = rng.choice(sorted(SHIRT_COLORS))
    extra = {"pants": rng.choice(PANTS), "skin": rng.choice(SKIN), "stride": rng.uniform(-1, 1)}
    return DemoObject(kind, color, round(x, 2), round(z, 2), round(h, 2), round(w, 2), round(l, 2),
                      round(ry, 2), extra=extra)


def _collides(o: DemoObject, placed: list[DemoObject]) -> bool:
    return any(abs(o.x - p.x) < (o.w + p.w) / 2 + 0.4 and abs(o.z - p.z) < (o.l + p.l) / 2 + 1.5
               for p in placed)


def _coverage(box: Sequence[float], nearer: list[Sequence[float]]) -> float:
    """The share of ``box`` covered by any of ``nearer`` (sampled on a 12 x 12 grid)."""
    if not nearer:
        return 0.0
    hits = 0
    for i in range(12):
        for j in range(12):
            u = box[0] + (i + 0.5) / 12 * (box[2] - box[0])
            v = box[1] + (j + 0.5) / 12 * (box[3] - box[1])
            hits += any(b[0] <= u <= b[2] and b[1] <= v <= b[3] for b in nearer)
    return hits / 144


def plan_scene(index: int, seed: int) -> Scene:
    """The objects and look of image ``index``; a pure function of ``(index, seed)``."""
    rng = random.Random(f"refexp-demo/{seed}/{index}")
    kinds: list[str] = []
    if index != NO_OBJECTS_INDEX:
        kinds = ["Car"] * rng.randint(2, 5)
        kinds += [k for k, p in (("Van", 0.4), ("Truck", 0.3)) if rng.random() < p]
        if index == 0:
            kinds += ["Van", "Truck", "Pedestrian", "Cyclist"]
        kinds += ["Pedestrian"] * rng.choice((0, 0, 1, 1, 2, 3))
        kinds += ["Cyclist"] * rng.choice((0, 0, 0, 1, 1, 2))
    placed: list[DemoObject] = []
    for kind in kinds:
        for _ in range(40):
            o = _vehicle(rng, kind) if kind in ("Car", "Van", "Truck") else _person(rng, kind)
            if not _collides(o, placed):
                placed.append(o)
                break
    # measure: truncation against the frame, occlusion by nearer objects; drop the unusable
    placed.sort(key=lambda o: o.z - o.l / 2)
    kept: list[DemoObject] = []
    for o in placed:
        full = _box_extent(o)
        clipped = _clip(full)
        truncated = 1.0 - _area(clipped) / _area(full) if _area(full) > 0 else 1.0
        cover = _coverage(clipped, [k.bbox for k in kept])
        if truncated > 0.5 or cover > 0.7 or clipped[2] - clipped[0] < 4 or clipped[3] - clipped[1] < 8:
            continue
        o.bbox = tuple(round(v, 2) for v in clipped)  # type: ignore[assignment]
        o.truncated = round(truncated, 2)
        o.occluded = 0 if cover < 0.1 else (1 if cover < 0.5 else 2)
        kept.append(o)
    crowd: list[DemoObject] = []
    dontcare: list[tuple[float, float, float, float]] = []
    if index == DONTCARE_INDEX:
        for k in range(3):
            car = _vehicle(rng, "Car")
            car.x, car.z = -LANE_W + k * 1.2 * LANE_W + rng.uniform(-0.3, 0.3), rng.uniform(75, 95)
            car.ry = -math.pi / 2 if car.x > -1 else math.pi / 2
            crowd.append(car)
        boxes = [_box_extent(c) for c in crowd]
        dontcare.append(tuple(round(v, 2) for v in _clip(  # type: ignore[arg-type]
            (min(b[0] for b in boxes) - 2, min(b[1] for b in boxes) - 2,
             max(b[2] for b in boxes) + 2, max(b[3] for b in boxes) + 2))))
    dusk = index == DUSK_INDEX
    brightness = 0.5 if dusk else rng.uniform(0.9, 1.08)
    return Scene(index=index, objects=sorted(kept, key=lambda o: (o.bbox[0], o.bbox[1])),
                 dontcare=dontcare, crowd=crowd, brightness=brightness,
                 overcast=rng.random() < 0.25, dusk=dusk, seed=seed)


# --------------------------------------------------------------------------- drawing


def _shade(c: Color, f: float) -> Color:
    return tuple(max(0, min(255, round(v * f))) for v in c)  # type: ignore[return-value]


class _Painter:
    """Draws on a supersampled canvas in camera-frame metres."""

    def __init__(self, image: Image.Image):
        self.image = image
        self.draw = ImageDraw.Draw(image)
        self.s = SUPERSAMPLE

    def px(self, x: float, y: float, z: float) -> tuple[float, float]:
        u, v = project(x, y, max(z, 0.2))
        return u * self.s, v * self.s

    def poly(self, pts3d: Sequence[tuple[float, float, float]], fill: Color) -> None:
        self.draw.polygon([self.px(*p) for p in pts3d], fill=fill)

    def quad_x(self, x: float, z1: float, z2: float, y1: float, y2: float, fill: Color) -> None:
        """A rectangle in the plane ``x = const`` (a side face), ``y`` heights above the road."""
        g = CAM_HEIGHT
        self.poly([(x, g - y1, z1), (x, g - y1, z2), (x, g - y2, z2), (x, g - y2, z1)], fill)

    def quad_z(self, z: float, x1: float, x2: float, y1: float, y2: float, fill: Color) -> None:
        """A rectangle in the plane ``z = const`` (a face towards the camera)."""
        g = CAM_HEIGHT
        self.poly([(x1, g - y1, z), (x2, g - y1, z), (x2, g - y2, z), (x1, g - y2, z)], fill)

    def quad_y(self, y: float, x1: float, x2: float, z1: float, z2: float, fill: Color) -> None:
        """A rectangle in the plane ``height = y`` (a roof, a road marking)."""
        g = CAM_HEIGHT
        self.poly([(x1, g - y, z1), (x2, g - y, z1), (x2, g - y, z2), (x1, g - y, z2)], fill)

    def block(self, x1: float, x2: float, z1: float, z2: float, y1: float, y2: float, color: Color) -> None:
        """An axis-aligned box: the faces the camera sees, shaded, far faces first."""
        if x1 > 0:
            self.quad_x(x1, z1, z2, y1, y2, _shade(color, 0.85))
        if x2 < 0:
            self.quad_x(x2, z1, z2, y1, y2, _shade(color, 0.85))
        if y2 < CAM_HEIGHT:
            self.quad_y(y2, x1, x2, z1, z2, _shade(color, 1.1))
        self.quad_z(z1, x1, x2, y1, y2, color)

    def side_x(self, x1: float, x2: float) -> float | None:
        """The x of the side face the camera sees, if any."""
        if x1 > 0:
            return x1
        if x2 < 0:
            return x2
        return None


def _draw_background(p: _Painter, scene: Scene, rng: random.Random) -> None:
    s = p.s
    w, h = WIDTH * s, HEIGHT * s
    horizon = int(CY * s)
    if scene.dusk:
        top, low = (52, 58, 96), (236, 150, 96)
    elif scene.overcast:
        top, low = (170, 176, 186), (214, 218, 222)
    else:
        top, low = (92, 146, 214), (196, 220, 242)
    for y in range(horizon + 1):
        t = y / max(1, horizon)
        p.draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, low, strict=True)))
    p.draw.rectangle([0, horizon, w, h], fill=(96, 122, 70))
    far = 400.0
    # sidewalks, parking strips and road, as ground-plane strips to the vanishing point
    for x1, x2, color in ((-WALK_EDGE, -PARK_EDGE, (168, 166, 160)), (PARK_EDGE, WALK_EDGE, (168, 166, 160)),
                          (-PARK_EDGE, PARK_EDGE, (84, 84, 88))):
        p.poly([(x1, CAM_HEIGHT, 3.0), (x2, CAM_HEIGHT, 3.0), (x2, CAM_HEIGHT, far), (x1, CAM_HEIGHT, far)],
               color)
    for x in (-PARK_EDGE, PARK_EDGE):   # curbs
        p.quad_x(x, 3.0, far, 0.0, 0.15, (190, 188, 182))
    paint = (226, 226, 220)
    for x in (-ROAD_EDGE, ROAD_EDGE):
        p.quad_y(0.0, x - 0.08, x + 0.08, 3.0, far, paint)
    offset = rng.uniform(0, 9)
    for x in (-LANE_W / 2, LANE_W / 2):
        z = 3.0 + offset
        while z < 160:
            p.quad_y(0.0, x - 0.07, x + 0.07, z, z + 3.0, paint)
            z += 9.0
    # facades and trees along both sides, far first
    items = []
    for side in (-1, 1):
        z = rng.uniform(4, 10)
        while z < 160:
            length = rng.uniform(8, 22)
            if rng.random() < 0.65:
                items.append(("house", side, z, z + length, rng.uniform(6, 14), rng.choice(FACADES)))
            else:
                items.append(("trees", side, z, z + length, rng.uniform(4, 7), (46, 98, 44)))
            z += length + rng.uniform(0, 4)
    items.sort(key=lambda it: -it[2])
    for kind, side, z1, z2, height, color in items:
        x = side * rng.uniform(12.5, 14.0)
        if kind == "house":
            p.quad_x(x, z1, z2, 0.0, height, _shade(color, 0.92))
            win = (70, 84, 100)
            floor = 1.0
            while floor + 1.6 < height:
                zz = z1 + 1.0
                while zz + 1.4 < z2:
                    p.quad_x(x, zz, zz + 1.2, floor, floor + 1.4, win)
                    zz += 2.6
                floor += 3.0
            eave, ridge = CAM_HEIGHT - height, CAM_HEIGHT - height - 2.2   # roof, sloping away
            p.poly([(x, eave, z1), (x, eave, z2), (x + side * 3.0, ridge, z2), (x + side * 3.0, ridge, z1)],
                   (150, 70, 56))
        else:
            zz = z1
            while zz < z2:
                trunk_x = side * (WALK_EDGE + 0.8)
                p.quad_z(zz, trunk_x - 0.15, trunk_x + 0.15, 0.0, 2.5, (88, 64, 44))
                cx_, cy_ = p.px(trunk_x, CAM_HEIGHT - height, zz)
                r = FOCAL * 2.2 / zz * s
                leaf = _shade(color, rng.uniform(0.8, 1.2))
                p.draw.ellipse([cx_ - r, cy_ - r, cx_ + r, cy_ + r * 0.9], fill=leaf)
                zz += rng.uniform(5, 9)


def _wheels(p: _Painter, o: DemoObject, z_near: float, radius: float, axles: Sequence[float]) -> None:
    for t in axles:
        z1 = z_near + t * o.l - radius
        for x1, x2 in ((o.x - o.w / 2, o.x - o.w / 2 + 0.24), (o.x + o.w / 2 - 0.24, o.x + o.w / 2)):
            p.block(x1, x2, z1, z1 + 2 * radius, 0.0, 2 * radius, TYRE)


def _lights(p: _Painter, o: DemoObject, z: float, y1: float, y2: float, inset: float, size: float) -> None:
    lamp = (250, 244, 214) if o.toward else (206, 24, 28)
    left, right = o.x - o.w / 2 + inset, o.x + o.w / 2 - inset
    p.quad_z(z, left, left + size, y1, y2, lamp)
    p.quad_z(z, right - size, right, y1, y2, lamp)


def _plate(p: _Painter, o: DemoObject, z: float, y: float) -> None:
    p.quad_z(z, o.x - 0.26, o.x + 0.26, y, y + 0.11, (232, 232, 228))


def _draw_car(p: _Painter, o: DemoObject, body: Color) -> None:
    zn, h = o.z - o.l / 2, o.h
    x1, x2 = o.x - o.w / 2, o.x + o.w / 2
    _wheels(p, o, zn, 0.31, (0.18, 0.8))
    p.block(x1, x2, zn, zn + o.l, 0.22, 0.58 * h, body)
    cab1, cab2 = (0.36, 0.82) if o.toward else (0.2, 0.68)
    cx1, cx2 = o.x - 0.43 * o.w, o.x + 0.43 * o.w
    p.block(cx1, cx2, zn + cab1 * o.l, zn + cab2 * o.l, 0.58 * h, h, body)
    # glass: the window facing us, and the side windows we see
    p.quad_z(zn + cab1 * o.l, cx1 + 0.06, cx2 - 0.06, 0.62 * h, 0.94 * h, GLASS)
    sx = p.side_x(cx1, cx2)
    if sx is not None:
        p.quad_x(sx, zn + (cab1 + 0.05) * o.l, zn + (cab2 - 0.05) * o.l, 0.62 * h, 0.94 * h, GLASS)
    p.quad_z(zn, x1, x2, 0.22, 0.34, _shade(body, 0.55))            # bumper
    _lights(p, o, zn, 0.45 * h, 0.54 * h, 0.04, 0.3)
    if o.toward:
        p.quad_z(zn, o.x - 0.32, o.x + 0.32, 0.4 * h, 0.5 * h, (40, 40, 44))   # grille
    _plate(p, o, zn, 0.34 * h if not o.toward else 0.22)


def _draw_van(p: _Painter, o: DemoObject, body: Color) -> None:
    zn, h = o.z - o.l / 2, o.h
    x1, x2 = o.x - o.w / 2, o.x + o.w / 2
    _wheels(p, o, zn, 0.33, (0.16, 0.82))
    p.block(x1, x2, zn, zn + o.l, 0.28, h, body)
    sx = p.side_x(x1, x2)
    if o.toward:
        p.quad_z(zn, x1 + 0.08, x2 - 0.08, 0.58 * h, 0.9 * h, GLASS)           # windscreen
        p.quad_z(zn, o.x - 0.4, o.x + 0.4, 0.34 * h, 0.44 * h, (40, 40, 44))
        _lights(p, o, zn, 0.36 * h, 0.44 * h, 0.06, 0.3)
    else:
        p.quad_z(zn, x1 + 0.1, o.x - 0.05, 0.6 * h, 0.88 * h, GLASS)
        p.quad_z(zn, o.x + 0.05, x2 - 0.1, 0.6 * h, 0.88 * h, GLASS)
        p.quad_z(zn, o.x - 0.01, o.x + 0.01, 0.28, h, _shade(body, 0.6))      # door seam
        _lights(p, o, zn, 0.3 * h, 0.5 * h, 0.03, 0.14)
    if sx is not None:
        for a, b in ((0.06, 0.3), (0.36, 0.6), (0.66, 0.9)):
            p.quad_x(sx, zn + a * o.l, zn + b * o.l, 0.6 * h, 0.86 * h, GLASS)
    p.quad_z(zn, x1, x2, 0.28, 0.4, _shade(body, 0.55))
    _plate(p, o, zn, 0.42)


def _draw_truck(p: _Painter, o: DemoObject, body: Color) -> None:
    zn, h = o.z - o.l / 2, o.h
    x1, x2 = o.x - o.w / 2, o.x + o.w / 2
    _wheels(p, o, zn, 0.5, (0.1, 0.2, 0.85) if not o.toward else (0.15, 0.8, 0.9))
    cab = 2.2
    if o.toward:
        p.block(x1 + 0.05, x2 - 0.05, zn + cab + 0.2, zn + o.l, 0.9, h, _shade(body, 0.95))   # box
        p.block(x1, x2, zn, zn + cab, 0.6, 0.82 * h, body)                                  # cab
        p.quad_z(zn, x1 + 0.12, x2 - 0.12, 0.56 * h, 0.78 * h, GLASS)
        p.quad_z(zn, o.x - 0.6, o.x + 0.6, 0.3 * h, 0.44 * h, (40, 40, 44))
        _lights(p, o, zn, 0.28 * h, 0.34 * h, 0.08, 0.35)
        sx = p.side_x(x1, x2)
        if sx is not None:
            p.quad_x(sx, zn + 0.3, zn + cab - 0.4, 0.58 * h, 0.76 * h, GLASS)
    else:
        p.block(x1 + 0.05, x2 - 0.05, zn + o.l - cab, zn + o.l, 0.6, 0.82 * h, body)         # cab
        p.block(x1, x2, zn, zn + o.l - cab - 0.2, 0.9, h, body)                              # box
        p.quad_z(zn, o.x - 0.015, o.x + 0.015, 0.9, h, _shade(body, 0.55))                  # doors
        p.quad_z(zn, x1, x2, 0.6, 0.8, (36, 36, 38))                                        # bar
        _lights(p, o, zn, 0.62, 0.78, 0.1, 0.3)


def _figure_frame(p: _Painter, o: DemoObject) -> tuple[float, float, float]:
    """A person's foot point (u, v) and height hp on the canvas, in drawing pixels."""
    u, v = project(o.x, CAM_HEIGHT, o.z)
    hp = FOCAL * o.h / o.z
    return u * p.s, v * p.s, hp * p.s


def _draw_pedestrian(p: _Painter, o: DemoObject) -> None:
    u, v, hp = _figure_frame(p, o)
    shirt, pants, skin = SHIRT_COLORS[o.color], o.extra["pants"], o.extra["skin"]
    d = p.draw
    stride = 0.09 * hp * o.extra["stride"]
    hip = v - 0.5 * hp
    leg = 0.055 * hp
    for foot in (u - 0.1 * hp + stride, u + 0.1 * hp - stride):
        d.polygon([(u - leg, hip), (u + leg, hip), (foot + leg * 0.8, v - 0.03 * hp),
                   (foot - leg * 0.8, v - 0.03 * hp)], fill=pants)
        d.rectangle([foot - leg, v - 0.035 * hp, foot + leg * 1.2, v], fill=(30, 28, 26))
    sh = 0.13 * hp
    d.rounded_rectangle([u - sh, v - 0.84 * hp, u + sh, hip + 0.02 * hp], radius=max(1, sh * 0.4), fill=shirt)
    for side in (-1, 1):
        ax = u + side * (sh + 0.03 * hp)
        swing = side * stride * 0.6
        d.polygon([(ax - 0.03 * hp, v - 0.82 * hp), (ax + 0.03 * hp, v - 0.82 * hp),
                   (ax + swing + 0.025 * hp, v - 0.5 * hp), (ax + swing - 0.025 * hp, v - 0.5 * hp)],
                  fill=_shade(shirt, 0.85))
        d.ellipse([ax + swing - 0.025 * hp, v - 0.52 * hp, ax + swing + 0.025 * hp, v - 0.46 * hp], fill=skin)
    d.rectangle([u - 0.025 * hp, v - 0.88 * hp, u + 0.025 * hp, v - 0.83 * hp], fill=skin)
    r = 0.062 * hp
    d.ellipse([u - r, v - hp, u + r, v - hp + 2 * r], fill=skin)
    d.chord([u - r, v - hp, u + r, v - hp + 2 * r], 180, 360, fill=(44, 32, 26))


def _draw_cyclist(p: _Painter, o: DemoObject) -> None:
    u, v, hp = _figure_frame(p, o)
    shirt, pants, skin = SHIRT_COLORS[o.color], o.extra["pants"], o.extra["skin"]
    d = p.draw
    d.ellipse([u - 0.03 * hp, v - 0.38 * hp, u + 0.03 * hp, v], fill=TYRE)          # wheel, end-on
    seat = v - 0.52 * hp
    for side in (-1, 1):
        knee = u + side * 0.07 * hp
        pedal = v - 0.2 * hp
        d.polygon([(u + side * 0.02 * hp, seat), (u + side * 0.08 * hp, seat),
                   (knee + side * 0.02 * hp, pedal), (knee - side * 0.03 * hp, pedal)], fill=pants)
    d.rounded_rectangle([u - 0.11 * hp, v - 0.84 * hp, u + 0.11 * hp, seat + 0.02 * hp],
                        radius=max(1, 0.04 * hp), fill=shirt)
    bar = v - 0.62 * hp
    d.line([(u - 0.16 * hp, bar), (u + 0.16 * hp, bar)], fill=(50, 50, 54), width=max(1, int(0.015 * hp)))
    for side in (-1, 1):
        d.polygon([(u + side * 0.08 * hp, v - 0.8 * hp), (u + side * 0.12 * hp, v - 0.8 * hp),
                   (u + side * 0.16 * hp, bar), (u + side * 0.13 * hp, bar)], fill=_shade(shirt, 0.85))
    r = 0.065 * hp
    d.ellipse([u - r, v - hp, u + r, v - hp + 2 * r], fill=skin)
    helmet = (200, 40, 40)
    d.chord([u - r * 1.1, v - hp - r * 0.1, u + r * 1.1, v - hp + 1.6 * r], 180, 360, fill=helmet)


def _draw_object(p: _Painter, o: DemoObject) -> None:
    if o.kind == "Pedestrian":
        _draw_pedestrian(p, o)
    elif o.kind == "Cyclist":
        _draw_cyclist(p, o)
    else:
        body = VEHICLE_COLORS[o.color]
        {"Car": _draw_car, "Van": _draw_van, "Truck": _draw_truck}[o.kind](p, o, body)


def render_scene(scene: Scene) -> Image.Image:
    """The scene drawn at 1242x375 (RGB)."""
    rng = random.Random(f"refexp-demo-look/{scene.seed}/{scene.index}")
    big = Image.new("RGB", (WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE))
    p = _Painter(big)
    _draw_background(p, scene, rng)
    for o in sorted([*scene.crowd, *scene.objects], key=lambda o: -(o.z - o.l / 2)):
        _draw_object(p, o)
    image = big.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    # sensor grain: low-resolution random texture from the seeded generator, lightly blended
    gw, gh = WIDTH // 3, HEIGHT // 3
    grain = Image.frombytes("L", (gw, gh), rng.randbytes(gw * gh))
    grain = grain.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    image = Image.blend(image, Image.merge("RGB", (grain, grain, grain)), 0.05)
    if scene.brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(scene.brightness)
    return image


# --------------------------------------------------------------------------- dataset


def make_demo_dataset(out_dir: Path, n_images: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n_images`` drawn scenes and their KITTI labels; returns ``(images_dir, labels_dir)``.

    Deterministic: the same ``seed`` gives the same files, byte for byte.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    out_dir = Path(out_dir)
    images_dir, labels_dir = out_dir / "images", out_dir / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    for index in range(n_images):
        scene = plan_scene(index, seed)
        image = render_scene(scene)
        for stale in (".png", ".jpg"):
            if stale != scene.suffix:
                (images_dir / f"{scene.stem}{stale}").unlink(missing_ok=True)
        path = images_dir / f"{scene.stem}{scene.suffix}"
        if scene.suffix == ".jpg":
            image.save(path, format="JPEG", quality=92)
        else:
            image.save(path, format="PNG")
        label = labels_dir / f"{scene.stem}.txt"
        if index == MISSING_LABEL_INDEX:
            label.unlink(missing_ok=True)
        else:
            label.write_text(scene.label_text(), encoding="utf-8")
    return images_dir, labels_dir


if __name__ == "__main__":  # pragma: no cover - a convenience for demos
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic KITTI-style demo dataset.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    imgs, labels = make_demo_dataset(args.out_dir, args.n_images, args.seed)
    print(f"images: {imgs}\nlabels: {labels}")
