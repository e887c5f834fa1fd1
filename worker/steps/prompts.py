"""The four prompts, ported in substance from TAO's ``image_referring_expression/prompts.py``.

Same instructions, same output formats, so a model tuned on the reference behaves the same.
Users may replace any template through ``workflow.prompts_file`` (YAML: step name -> template);
placeholders are checked when the file is loaded, not when the first image fails.
"""

from __future__ import annotations

import string
from pathlib import Path

import yaml

from worker.errors import ConfigError

PROMPT_TEMPLATES: dict[str, str] = {
    "region_expr": (
        "You are an AI visual assistant. Describe each object in one short, "
        "discriminative phrase.\n\n"
        "Objects in the image at [x1, y1, x2, y2]: {bboxes}\n\n"
        "For each object, write a \"description\" that would let someone pick it "
        "out from the other objects. Follow these rules:\n"
        "1. Lead with color (if visible) and object type (sedan, SUV, van, bus, "
        "truck, pickup, motorcycle, scooter, bicycle, pedestrian, etc.).\n"
        "2. Add ONE distinguishing detail — pick whichever is most discriminative:\n"
        "   - Spatial position: lane, side of road, relative to a landmark "
        "(e.g., \"in the center lane\", \"near the crosswalk\").\n"
        "   - Relation to a neighbor: \"behind the red bus\", \"to the left of the white van\".\n"
        "   - Action or state: \"turning right\", \"stopped at the light\", "
        "\"walking across the street\".\n"
        "3. Keep each description under 15 words. Do not list multiple attributes if one is "
        "enough to distinguish the object.\n"
        "4. Base descriptions only on what is visible — no guessing.\n\n"
        "Good examples:\n"
        "- \"The white sedan driving in the center lane\"\n"
        "- \"A red SUV stopped behind the blue truck\"\n"
        "- \"Pedestrian in a dark jacket crossing near the traffic light\"\n"
        "- \"Silver pickup parked on the right shoulder\"\n\n"
        "Output ONLY a JSON array. Each element must have exactly these fields:\n"
        "  \"bbox_2d\": [x1, y1, x2, y2], \"type\": <object type>, "
        "\"color\": <primary color or \"unknown\">, \"description\": <short phrase>\n"
    ),
    "image_caption": (
        "You are an AI visual assistant that specializes in providing clear and "
        "accurate descriptions of images without any ambiguity or uncertainty. "
        "Your descriptions should focus solely on the content of the image "
        "itself and avoid mentioning any location-specific details such as "
        "regions or countries where the image might have been captured."
    ),
    "grounding_expr": (
        "As an AI visual assistant, your role involves analyzing a single image.\n"
        "You are supplied with data about specific attributes of objects within the image, "
        "including categories, colors, and precise coordinates [x1, y1, x2, y2].\n"
        "{bboxes}\n"
        "{caption_section}\n"
        "Your task is to classify the provided objects into groups based on shared characteristics "
        "(e.g., direction of travel, type, color, lane position), while justifying each grouping "
        "with direct visual evidence from the image.\n\n"
        "IMPORTANT — output format rules (follow exactly):\n"
        "- Output ONLY the final classification lines. Do not include any reasoning, headers, "
        "bullet points, or markdown formatting.\n"
        "- Each line must follow this exact format:\n"
        "  <descriptive phrase>: [[x1, y1, x2, y2], [x1, y1, x2, y2], ...]\n"
        "- Each line represents ONE group. All bounding boxes for that group must appear on the "
        "same line inside double brackets.\n"
        "- Do not use single brackets. Do not use asterisks, dashes, or any other decoration.\n"
        "- Do not output anything before or after the classification lines.\n"
    ),
    "double_check": (
        "You are verifying grounding expressions against an image. Each line below is a "
        "grounding phrase with one or more bounding boxes [x1, y1, x2, y2]:\n"
        "{expr}\n\n"
        "For each bounding box, check these criteria by looking at the image:\n"
        "1. Does the box contain an object that matches the described type (e.g., sedan, SUV, "
        "pedestrian)?\n"
        "2. Does the object's color match the phrase?\n"
        "3. Is the spatial description accurate (e.g., \"in the left lane\", \"parked on the right\")?\n"
        "4. Does the box tightly frame the object, or is it on empty space / a different object?\n\n"
        "Actions:\n"
        "- KEEP a bounding box unchanged if it passes all checks.\n"
        "- REMOVE a bounding box from its group if the object inside does not match the phrase.\n"
        "- UPDATE a bounding box's coordinates only if the box is on the right object but poorly "
        "aligned.\n"
        "- Do NOT add new bounding boxes that were not in the input.\n"
        "- Do NOT rewrite phrases — keep them exactly as given.\n\n"
        "Output ONLY the corrected list in the same format:\n"
        "  <original phrase>: [[x1, y1, x2, y2], ...]\n"
        "Omit any line whose bounding boxes were all removed. Do not include reasoning or "
        "commentary in the output.\n"
    ),
}

# Structured mode (``vlm.structured_output: auto``): the same instructions, but every input box
# carries an id and the model answers JSON (constrained by a schema where the API has one)
# with ids instead of coordinates, so nothing has to be copied back digit by digit.
_STEP0_RULES = PROMPT_TEMPLATES["region_expr"].split("For each object, ", 1)[1].split("Output ONLY", 1)[0]
_STEP3_CHECKS = PROMPT_TEMPLATES["double_check"].split("{expr}\n\n", 1)[1].split("Actions:", 1)[0]

STRUCTURED_TEMPLATES: dict[str, str] = {
    "region_expr_structured": (
        "You are an AI visual assistant. Describe each object in one short, "
        "discriminative phrase.\n\n"
        "Objects in the image, one per line as <id>: <type> [x1, y1, x2, y2]:\n{objects}\n\n"
        "For each object, " + _STEP0_RULES.replace("{", "{{").replace("}", "}}")
        + "Answer with a JSON object {{\"objects\": [...]}} holding one element for each id above, "
        "each with exactly these fields:\n"
        "  \"id\": <the object's id>, \"type\": <object type>, "
        "\"color\": <primary color or \"unknown\">, \"description\": <short phrase>\n"
        "Do not repeat the coordinates.\n"
    ),
    "grounding_expr_structured": (
        "As an AI visual assistant, your role involves analyzing a single image.\n"
        "You are supplied with the objects in the image, one per line as "
        "<id>: <description> [x1, y1, x2, y2]:\n{objects}\n"
        "{caption_section}\n"
        "Your task is to classify the provided objects into groups based on shared characteristics "
        "(e.g., direction of travel, type, color, lane position), while justifying each grouping "
        "with direct visual evidence from the image.\n\n"
        "Answer with a JSON object {{\"groups\": [...]}} with one element per group: "
        "{{\"phrase\": <descriptive phrase for the group>, \"box_ids\": [<ids of the objects in the group>]}}.\n"
        "Use only the ids listed above. Do not include reasoning or coordinates.\n"
    ),
    "double_check_structured": (
        "You are verifying grounding expressions against an image. Each group below is a "
        "grounding phrase with its boxes, written as \"<phrase>\": {{<id>: [x1, y1, x2, y2], ...}}:\n"
        "{groups}\n\n"
        + _STEP3_CHECKS.replace("{", "{{").replace("}", "}}")
        + "Actions:\n"
        "- KEEP a box's id if the box passes all checks.\n"
        "- REMOVE a box's id from its group if the object inside does not match the phrase.\n"
        "- Do NOT add ids that were not in the group.\n"
        "- Do NOT rewrite phrases — keep them exactly as given.\n\n"
        "Answer with a JSON object {{\"groups\": [...]}} with one element per group that keeps at "
        "least one box: {{\"phrase\": <original phrase>, \"box_ids\": [<ids kept>]}}.\n"
    ),
}
# The placeholders each template must use, no more and no fewer.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "region_expr": frozenset({"bboxes"}),
    "image_caption": frozenset(),
    "grounding_expr": frozenset({"bboxes", "caption_section"}),
    "double_check": frozenset({"expr"}),
}
STRUCTURED_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "region_expr_structured": frozenset({"objects"}),
    "grounding_expr_structured": frozenset({"objects", "caption_section"}),
    "double_check_structured": frozenset({"groups"}),
}


def template_for(templates: dict[str, str], name: str, structured: bool) -> str:
    """The template a step uses: ``<name>_structured`` in structured mode (the user's if their
    prompts file has one, else ours), else ``<name>``."""
    if structured:
        key = f"{name}_structured"
        return templates.get(key) or STRUCTURED_TEMPLATES[key]
    return templates[name]


def placeholders_of(template: str) -> set[str]:
    """Field names a ``str.format`` template uses; raises ValueError on a malformed template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(name: str, template: str, source: str = "prompts") -> None:
    """Raise ConfigError naming the template when its placeholders are not the expected ones."""
    known = {**PLACEHOLDERS, **STRUCTURED_PLACEHOLDERS}
    if name not in known:
        raise ConfigError(f"{source}: unknown prompt '{name}' (valid: {', '.join(known)})")
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{source}: prompt '{name}' must be a non-empty string")
    try:
        used = placeholders_of(template)
    except ValueError as exc:
        raise ConfigError(f"{source}: prompt '{name}' is not a valid template: {exc}") from None
    want = known[name]
    missing, unknown = want - used, used - want
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing {" + "}, {".join(sorted(missing)) + "}")
        if unknown:
            parts.append("unknown {" + "}, {".join(sorted(unknown)) + "}")
        raise ConfigError(
            f"{source}: prompt '{name}' has " + " and ".join(parts)
            + f" (it must use exactly: {', '.join('{' + p + '}' for p in sorted(want)) or 'none'})"
        )


def load_prompts(prompts_file: str | Path | None) -> dict[str, str]:
    """Our templates, with the ones in ``prompts_file`` (if given) replacing them, all checked."""
    templates = dict(PROMPT_TEMPLATES)
    if not prompts_file:
        return templates
    path = Path(prompts_file)
    if not path.is_file():
        raise ConfigError(f"workflow.prompts_file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must map step names ({', '.join(PLACEHOLDERS)}) to templates")
    for name, template in data.items():
        check_template(str(name), template, source=str(path))
        templates[str(name)] = template
    return templates
