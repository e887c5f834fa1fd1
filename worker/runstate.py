"""Run state in Redis: the public spec, the per-step done / failed / blocked indexes, heartbeats.

The sinks on the shared volume are the truth. Redis holds an index over them so a worker can
tell in one round trip whether an image-step is done, and where its record sits:
``done:{step}`` maps ``image_id -> byte offset`` in that step's sink. ``failed:{step}`` and
``blocked:{step}`` hold a short reason. If Redis loses the index, ``reindex`` rebuilds it from
the sinks. No secret is ever written here.

What a task changes here is done by one Lua script (``_MARK_AND_SETTLE``): its mark, its
counters and the settle check in one round trip and as few commands as Redis can run them,
since every command inside a script counts against what one Redis serves (bench/redis_cost.py).
A task done whose canvas runs a later step of the image after it needs no settle check (the
later step's settles the image): its mark and counters go out as a plain pipeline (``finish``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import redis

from worker.keys import run_key

if TYPE_CHECKING:
    from worker.reindex import IndexRebuild


@dataclass(frozen=True)
class RunRef:
    """What a task message names: the run, and the version of its spec the producer stored
    (``"<run_id>:<spec_hash>"`` in the message). Built by the producer, parsed by the worker."""

    run_id: str
    spec_hash: str

    def __str__(self) -> str:
        return f"{self.run_id}:{self.spec_hash}"

    @classmethod
    def parse(cls, text: str) -> RunRef:
        run_id, _, spec_hash = text.partition(":")
        return cls(run_id, spec_hash)


class Outcome(StrEnum):
    """How an attempt at an image-step ended. DONE, FAILED and BLOCKED are marks kept in Redis
    (``done:<step>``, ``failed:<step>``, ``blocked:<step>``): an image-step holding one of them is
    settled. SKIPPED (done already) is only a task's answer."""

    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"
    SKIPPED = "skipped"


#: Done marks set aside while a ``reprocess: changed`` re-run checks their records' fingerprints.
RECHECK = "recheck"
#: ``bits:<step>``: one bit per image (at its seed ordinal) done in that step, for the images
#: that left the window done in every step; their offsets are no longer in ``done:<step>``.
BITS = "bits"
#: Set while a reindex rebuilds the index: settling moves no image to the bitmaps meanwhile.
REINDEXING = "reindexing"
REINDEXING_TTL = 3600  # a killed reindex stops the moves for an hour at most

#: The marks that settle an image-step, in the order ``counts`` and ``outcomes`` report them.
MARKS = (Outcome.DONE, Outcome.FAILED, Outcome.BLOCKED)

SPEC_TTL = 60 * 60 * 24 * 60  # the spec outlives any sane run; re-enqueue refreshes it
#: Entries the counters log (``tally``) holds before the script that appends one folds them all
#: into the ``usage`` and ``quality`` hashes: a task appends one entry (one command) instead of an
#: HINCRBY per counter (some 10 per task); a fold costs one HINCRBY per distinct counter.
TALLY_FOLD = 100

# Mark an image-step (or not) and settle the image, atomically: one round trip, and the fewest
# commands Redis runs (every call inside the script counts; bench/redis_cost.py).
# KEYS: queued, tally, usage, quality, reindexing, then done, failed, blocked, bits of each of
#       the run's steps.
# ARGV: image_id ("" to settle nothing), position of the marked step among the run's steps
#       (1-based; 0: mark nothing), mark (1 done, 2 failed, 3 blocked), value (sink offset or
#       reason), tally entry ("" for none: "<u|q><field>\t<n>\t..." with u for usage, q for
#       quality), TALLY_FOLD (0: fold now), the image's ordinal (-1: unknown).
# Returns 1 when every step of the image has a mark (it left the in-flight set), else 0.
# An image that leaves the window done in every step (and whose ordinal is known) is to move
# from the done hashes to the bitmaps: a move entry ("m<ordinal> <image_id>") goes to the
# ``tally`` list in the same RPUSH as the task's tally entry, and the fold moves the whole
# batch (per step one HMGET, one BITFIELD, one HDEL) instead of 4 SETBIT + 3 HDEL per image.
# So the index holds offsets only for the window, the images with a failed or blocked step, and
# the moves pending (fewer than TALLY_FOLD entries). Nothing moves while a reindex rebuilds the
# index (the ``reindexing`` key): the rebuild carries over hash entries set meanwhile, not bits.
_MARK_AND_SETTLE = """
local image, pos, mark = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ord = tonumber(ARGV[7] or '-1')
local head, per = 5, 4
local nsteps = (#KEYS - head) / per
local function key(i, k)
  return KEYS[head + (i - 1) * per + k]
end
-- Failed and blocked marks are rare: one EXISTS over all their hashes (and the reindex flag)
-- spares looking in them (and clearing them) image by image while the run has none.
local any_other_mark = false
if nsteps > 0 then
  local marks = {KEYS[5]}
  for i = 1, nsteps do
    marks[#marks + 1] = key(i, 2)
    marks[#marks + 1] = key(i, 3)
  end
  any_other_mark = redis.call('EXISTS', unpack(marks)) > 0
end
local reindexing = nil
local function is_reindexing()
  if reindexing == nil then
    reindexing = any_other_mark and redis.call('EXISTS', KEYS[5]) > 0
  end
  return reindexing
end
-- A command takes a bounded number of arguments from a script (Lua's unpack): long lists go in
-- chunks (a multiple of 3 and 4: BITFIELD's GET and SET operations stay whole).
local CHUNK = 1200
local function chunked(cmd, k, items)
  local out = {}
  for first = 1, #items, CHUNK do
    local got = redis.call(cmd, k, unpack(items, first, math.min(first + CHUNK - 1, #items)))
    if type(got) == 'table' then
      for _, v in ipairs(got) do out[#out + 1] = v end
    end
  end
  return out
end

-- The fold: the tally entries' counters into the usage and quality hashes (one HINCRBY per
-- distinct counter), and the move entries' images from the done hashes to the bitmaps.
local function fold()
  local totals, moves = {}, {}
  for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if string.sub(entry, 1, 1) == 'm' then
      moves[#moves + 1] = entry
    else
      for field, n in string.gmatch(entry, '([^\t]+)\t([^\t]+)') do
        totals[field] = (totals[field] or 0) + tonumber(n)
      end
    end
  end
  redis.call('DEL', KEYS[2])
  for field, n in pairs(totals) do
    local hash = string.sub(field, 1, 1) == 'u' and KEYS[3] or KEYS[4]
    redis.call('HINCRBY', hash, string.sub(field, 2), n)
  end
  if #moves == 0 then
    return
  end
  if nsteps == 0 or is_reindexing() then  -- kept for a later fold
    chunked('RPUSH', KEYS[2], moves)
    return
  end
  local ids, ords, movable = {}, {}, {}
  for j, entry in ipairs(moves) do
    local o, id = string.match(entry, '^m(%d+) (.*)$')
    ids[j], ords[j], movable[j] = id or '', o, o ~= nil
  end
  -- Only images still done in every step move: a forced redo or a `reprocess: changed` may
  -- have cleared a mark since the entry was written (the image is then in flight again, and
  -- its next settle writes a new entry). A step may be done as a bit already (the run's step
  -- list grew since the image first settled).
  for i = 1, nsteps do
    local present = chunked('HMGET', key(i, 1), ids)
    local miss, get = {}, {}
    for j = 1, #ids do
      if movable[j] and not present[j] then
        miss[#miss + 1] = j
        get[#get + 1] = 'GET'; get[#get + 1] = 'u1'; get[#get + 1] = ords[j]
      end
    end
    if #miss > 0 then
      local got = chunked('BITFIELD', key(i, 4), get)
      for n, j in ipairs(miss) do
        if got[n] == 0 then movable[j] = false end
      end
    end
  end
  local set, drop = {}, {}
  for j = 1, #ids do
    if movable[j] then
      set[#set + 1] = 'SET'; set[#set + 1] = 'u1'; set[#set + 1] = ords[j]; set[#set + 1] = 1
      drop[#drop + 1] = ids[j]
    end
  end
  if #drop == 0 then
    return
  end
  for i = 1, nsteps do
    chunked('BITFIELD', key(i, 4), set)
    chunked('HDEL', key(i, 1), drop)
    if any_other_mark then
      chunked('HDEL', key(i, 2), drop)
      chunked('HDEL', key(i, 3), drop)
    end
  end
end

local entries = {}
if ARGV[5] ~= '' then
  entries[1] = ARGV[5]
end
local function set_mark()
  if pos > 0 then
    redis.call('HSET', key(pos, mark), image, ARGV[4])
    if mark == 1 and any_other_mark then
      redis.call('HDEL', key(pos, 2), image)
      redis.call('HDEL', key(pos, 3), image)
    end
  end
end
local function settle()
  -- A step is settled by its done entry, a failed or blocked mark, or its bit. The bit is looked
  -- at by plain settles only (pos 0: a skipped task, the producer's settle after a publish): a
  -- task that marks has the image in flight, whose done steps have entries.
  local all_done = pos == 0 or mark == 1
  local done_steps = {}
  -- Later steps are the likelier to be unsettled: look at them first, and stop at the first.
  for i = nsteps, 1, -1 do
    if i ~= pos then
      if redis.call('HEXISTS', key(i, 1), image) == 1 then
        done_steps[#done_steps + 1] = i
      elseif pos > 0 or ord < 0 or redis.call('GETBIT', key(i, 4), ord) == 0 then
        -- An earlier step without an entry, under a done mark: a duplicate of this task that
        -- ran alongside may have settled the image, and the fold moved it, since this one
        -- looked (RunState.lookup). Its bit says so: an entry beside it would count it twice.
        if mark == 1 and i < pos and ord >= 0 and redis.call('GETBIT', key(pos, 4), ord) == 1 then
          return 0
        end
        if not any_other_mark then
          set_mark()
          return 0
        end
        if redis.call('HEXISTS', key(i, 2), image) == 0 and redis.call('HEXISTS', key(i, 3), image) == 0 then
          set_mark()
          return 0
        end
        all_done = false
      end
    end
  end
  redis.call('HDEL', KEYS[1], image)
  set_mark()
  -- A step done by its entry may still hold a stale failed or blocked mark (a duplicate
  -- canvas's), which a task marking done without the script (RunState.finish, settle=False)
  -- left: cleared here, so the settled image's status is exact.
  if any_other_mark then
    for _, i in ipairs(done_steps) do
      redis.call('HDEL', key(i, 2), image)
      redis.call('HDEL', key(i, 3), image)
    end
  end
  if all_done and ord >= 0 and not is_reindexing() then
    entries[#entries + 1] = 'm' .. ord .. ' ' .. image
  end
  return 1
end

local settled = 0
if nsteps > 0 and image ~= '' then
  settled = settle()
end
local fold_at = tonumber(ARGV[6])
local n = 0
if #entries > 0 then
  n = redis.call('RPUSH', KEYS[2], unpack(entries))
end
if fold_at <= 0 or (#entries > 0 and n >= fold_at) then
  fold()
end
return settled
"""
# Move entries of some images from one hash to another, in one round trip: done marks set
# aside for a ``reprocess: changed`` re-run (``RunState.clear_attempt``: the image-step is
# pending again, and the task finds the record it may keep under ``recheck``), and back
# (``restore_prior``). KEYS: from, to. ARGV: 1 to overwrite an entry already there (setting
# aside: the newest done mark wins) or 0 to keep it (restoring: a newer done mark wins), then
# the image ids. An image without an entry in ``from`` keeps what ``to`` holds (a re-run
# stopped midway left it there).
_MOVE_ENTRIES = """
local set = ARGV[1] == '1' and 'HSET' or 'HSETNX'
for i = 2, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    redis.call(set, KEYS[2], ARGV[i], value)
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
"""
# Drop the move entries from the ``tally`` list (its counter entries stay) and the reindex flag.
# KEYS: tally, reindexing.
_DROP_MOVES = """
local keep = {}
for _, entry in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.sub(entry, 1, 1) ~= 'm' then
    keep[#keep + 1] = entry
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
for first = 1, #keep, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(keep, first, math.min(first + 999, #keep)))
end
return 0
"""
WORKER_SEEN_WINDOW = 120.0
USAGE_FIELDS = ("input_tokens", "output_tokens", "image_tokens", "thinking_tokens")
#: Batch mode: the part of a call's tokens a provider batch job answered (batch-priced).
BATCH_USAGE_FIELDS = ("batch_input_tokens", "batch_output_tokens", "batch_thinking_tokens")


class RunState:
    """All Redis access for one run."""

    def __init__(self, client: redis.Redis, run_id: str):
        self.r = client
        self.run_id = run_id
        self._mark_and_settle = client.register_script(_MARK_AND_SETTLE)
        self._move_entries = client.register_script(_MOVE_ENTRIES)
        self._drop_moves = client.register_script(_DROP_MOVES)

    # -- spec ---------------------------------------------------------------------------------
    def store_spec(self, spec_hash: str, public_spec: dict, meta: dict,
                   prompts: dict[str, str] | None = None) -> None:
        """The spec (secrets blanked), the run's meta and the prompt templates the producer
        checked: workers use these templates, not the prompts file, so a file edited under a
        running fleet cannot change (or break) a run already enqueued."""
        pipe = self.r.pipeline()
        pipe.set(run_key(self.run_id, "spec", spec_hash), json.dumps(public_spec), ex=SPEC_TTL)
        if prompts is not None:
            pipe.set(run_key(self.run_id, "prompts", spec_hash), json.dumps(prompts), ex=SPEC_TTL)
        pipe.hset(run_key(self.run_id, "meta"), mapping={k: json.dumps(v) for k, v in meta.items()})
        pipe.execute()

    def load_spec(self, spec_hash: str) -> dict | None:
        raw = self.r.get(run_key(self.run_id, "spec", spec_hash))
        return json.loads(raw) if raw else None

    def load_prompts(self, spec_hash: str) -> dict[str, str] | None:
        raw = self.r.get(run_key(self.run_id, "prompts", spec_hash))
        return json.loads(raw) if raw else None

    def meta(self) -> dict:
        raw = self.r.hgetall(run_key(self.run_id, "meta"))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def set_meta(self, **values: object) -> None:
        self.r.hset(run_key(self.run_id, "meta"), mapping={k: json.dumps(v) for k, v in values.items()})

    # -- per image-step index ---------------------------------------------------------------
    def done_offset(self, step: int, image_id: str) -> int | None:
        """The offset of the image-step's record as the done hash holds it (None when not
        there: not done, or done and moved to the bitmap: ``is_done`` tells)."""
        raw = self.r.hget(run_key(self.run_id, Outcome.DONE, step), image_id)
        return int(raw) if raw is not None else None

    def is_done(self, step: int, image_id: str, ordinal: int | None, *, bit_only: bool = False) -> bool:
        """Whether the image-step is done: in the done hash, or its bit set (one round trip).
        ``bit_only``: the bit alone answers (a forced redo, whose done entries are redone)."""
        if bit_only and ordinal is None:
            return False
        pipe = self.r.pipeline(transaction=False)
        if not bit_only:
            pipe.hexists(run_key(self.run_id, Outcome.DONE, step), image_id)
        if ordinal is not None:
            pipe.getbit(run_key(self.run_id, BITS, step), ordinal)
        return any(pipe.execute())

    def done_many(self, step: int, image_ids: list[str], ordinals: list[int | None] | None = None) -> list[bool]:
        """Whether each image is done in ``step``: its done entry, or (``ordinals`` given) its
        bit; one round trip (an HMGET and one BITFIELD for the batch)."""
        if not image_ids:
            return []
        known = [(i, o) for i, o in enumerate(ordinals or []) if o is not None]
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(run_key(self.run_id, Outcome.DONE, step), image_ids)
        if known:
            args = [a for _, o in known for a in ("GET", "u1", o)]
            pipe.execute_command("BITFIELD", run_key(self.run_id, BITS, step), *args)
        raw = pipe.execute()
        done = [v is not None for v in raw[0]]
        for (i, _), bit in zip(known, raw[1] if known else [], strict=True):
            done[i] = done[i] or bool(bit)
        return done

    def done_offsets(self, image_id: str, steps: Iterable[int]) -> dict[int, int | None]:
        """``done_offset`` for several steps of one image in one round trip."""
        steps = list(steps)
        pipe = self.r.pipeline(transaction=False)
        for s in steps:
            pipe.hget(run_key(self.run_id, Outcome.DONE, s), image_id)
        return {s: int(raw) if raw is not None else None for s, raw in zip(steps, pipe.execute(), strict=True)}

    def lookup(self, image_id: str, steps: Iterable[int], prior_of: int | None, ordinal: int | None
               ) -> tuple[dict[int, int | None], set[int], int | None]:
        """What a task needs to know of its image: the done offsets of ``steps`` (its own step
        first, then the steps it reads), the steps whose done bit is set (``ordinal`` known: the
        image left the window done in every step, its offsets in the sinks only), and the record
        set aside for a check (``prior_of``). One round trip, with the first step's bit only
        (a late duplicate of a settled image's task must skip); a second one for the bits of
        steps whose offset is missing, which an image in flight does not have.

        The first step's bit is read even when another step's offset is there: an image can
        hold both (a duplicate task that looked it up in flight and commits after it moved to
        the bits writes its offset beside them), and must not be taken for one in flight."""
        steps = list(steps)
        pipe = self.r.pipeline(transaction=False)
        for s in steps:
            pipe.hget(run_key(self.run_id, Outcome.DONE, s), image_id)
        if prior_of is not None:
            pipe.hget(run_key(self.run_id, RECHECK, prior_of), image_id)
        if ordinal is not None:
            pipe.getbit(run_key(self.run_id, BITS, steps[0]), ordinal)
        raw = pipe.execute()
        offsets = {s: int(v) if v is not None else None for s, v in zip(steps, raw, strict=False)}
        prior = raw[len(steps)] if prior_of is not None else None
        bits: set[int] = set()
        if ordinal is not None:
            if raw[-1]:
                bits.add(steps[0])
            unknown = [s for s in steps[1:] if offsets[s] is None]
            if unknown and not bits:
                pipe = self.r.pipeline(transaction=False)
                for s in unknown:
                    pipe.getbit(run_key(self.run_id, BITS, s), ordinal)
                bits |= {s for s, b in zip(unknown, pipe.execute(), strict=True) if b}
        return offsets, bits, int(prior) if prior is not None else None

    def has_bits(self, steps: Iterable[int]) -> bool:
        """Whether any image of these steps is done as a bit (its offsets dropped)."""
        keys = [run_key(self.run_id, BITS, s) for s in steps]
        return bool(keys) and self.r.exists(*keys) > 0

    def has_prior(self, steps: Iterable[int]) -> bool:
        """Whether any record is set aside for a check (a ``changed`` re-run is, or was, going)."""
        keys = [run_key(self.run_id, RECHECK, s) for s in steps]
        return bool(keys) and self.r.exists(*keys) > 0

    def restore_prior(self, step: int, image_ids: list[str]) -> None:
        """Make the records set aside for these images done again (an enqueue that is not
        ``changed``, after a ``changed`` one stopped midway: they are records, so done)."""
        if image_ids:
            self._move_entries(keys=[run_key(self.run_id, RECHECK, step), run_key(self.run_id, Outcome.DONE, step)],
                               args=[0, *image_ids])

    def drop_prior(self, step: int, image_id: str) -> None:
        """Forget the record set aside for a check, once the image-step has its new outcome."""
        self.r.hdel(run_key(self.run_id, RECHECK, step), image_id)

    def mark_done(self, step: int, image_id: str, offset: int) -> None:
        pipe = self.r.pipeline()
        self._mark_done(pipe, step, image_id, offset)
        pipe.execute()

    def _mark_done(self, pipe, step: int, image_id: str, offset: int) -> None:
        pipe.hset(run_key(self.run_id, Outcome.DONE, step), image_id, offset)
        pipe.hdel(run_key(self.run_id, Outcome.FAILED, step), image_id)
        pipe.hdel(run_key(self.run_id, Outcome.BLOCKED, step), image_id)

    def repoint_done(self, step: int, image_id: str, offset: int | None) -> None:
        """Point a done entry at where its record is now (a finalize merged the part the old
        offset was in); None: the sink holds no record of it any more, so it is not done."""
        key = run_key(self.run_id, Outcome.DONE, step)
        if offset is None:
            self.r.hdel(key, image_id)
        else:
            self.r.hset(key, image_id, offset)

    def finish(self, step: int, image_id: str, offset: int, steps: list[int], *,
               call: dict | None = None, quality: dict | None = None, ordinal: int | None = None,
               settle: bool = True) -> bool:
        """``mark_done``, the call's usage and quality counters and ``settle``, atomically, in
        one round trip (one script); returns ``settle``'s answer. The settle check runs after
        the mark inside the same script, so of two header tasks finishing together the later
        one sees both marks. ``ordinal``: the image's seed ordinal, so that an image done in
        every step moves to the bitmaps as it settles (None: it keeps its offsets).

        ``settle=False``: a task whose canvas runs a later step of the image after it (a chord
        header, a chain part with more chain to come; ``worker.tasks.run_task`` decides). Its
        done mark and tally entry go out as a plain pipeline (``HSET`` and ``RPUSH``, one round
        trip, no script): no failed/blocked clean-up and no settle check, which could only
        answer "not settled" since the later step has no outcome yet. No image is stranded in
        the in-flight set by it: the later step always runs after this one returns (the chord
        body once every header part returned, the chain's next link once this one did), and
        its own settle (the full script: its mark's, its failure's or its skip's) sees this
        mark; should the canvas die between the two (the body or link lost with a worker or
        with Redis), the image's later step has no outcome, so the reconciler publishes it
        again and that settle runs then. A stale failed or blocked mark of this image-step (a
        duplicate canvas's) that the plain mark leaves is cleared by that full settle, which
        clears those of every step it finds done when the run has any such mark. Returns
        False (not settled) in that case."""
        tally = _tally(step, call, quality)
        if not settle:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(run_key(self.run_id, Outcome.DONE, step), image_id, offset)
            if tally:
                pipe.rpush(run_key(self.run_id, "tally"), tally)
            pipe.execute()
            return False
        return self._settle_script(image_id, steps, step, Outcome.DONE, offset, tally, ordinal)

    def add_usage(self, step: int, call: dict) -> None:
        """Count one finished call's tokens into ``usage`` (``<step>:<field>`` -> total), for
        live status; latency is kept in milliseconds so every field is an integer."""
        self._tally_only(_tally(step, call, None))

    def add_quality(self, step: int, quality: dict) -> None:
        """Add one image-step's quality report (``worker.steps.quality``) into ``quality``
        (``<step>:<count>``, ``<step>:repair:<kind>``, ``<step>:mode:<mode>`` -> total)."""
        self._tally_only(_tally(step, None, quality))

    def _tally_only(self, entry: str) -> None:
        self._mark_and_settle(keys=self._settle_keys([]), args=["", 0, 0, "", entry, TALLY_FOLD])

    def fold(self, steps: list[int]) -> None:
        """Fold the ``tally`` list now (``_MARK_AND_SETTLE`` does it every TALLY_FOLD entries):
        its counters into ``usage`` and ``quality``, and the images whose move is pending from
        the done hashes to the bitmaps (kept while a reindex runs). ``producer wait`` calls it
        when the run has finished, so a finished run's index is all bits; until then the moves
        pending cost the hash entries of fewer than TALLY_FOLD images."""
        self._mark_and_settle(keys=self._settle_keys(list(steps)), args=["", 0, 0, "", "", 0, -1])

    def drop_moves(self) -> None:
        """Forget the moves pending (their images keep their offsets in the done hashes) and end
        a reindex (``reindexing``), atomically: the index the reindex swapped in is the truth
        now, and ``submit.unpack_bits`` must leave no image to become a bit again by an entry
        written before it (a ``reprocess: changed`` re-run needs their offsets)."""
        self._drop_moves(keys=[run_key(self.run_id, "tally"), run_key(self.run_id, REINDEXING)])

    def usage(self) -> dict[int, dict[str, int]]:
        """``step -> {calls, input_tokens, ..., latency_ms}`` as counted by ``add_usage``."""
        return self._counters("u")

    def quality(self) -> dict[int, dict[str, int]]:
        """``step -> {field or 'repair:<kind>' or 'mode:<m>': total}`` as counted by ``add_quality``."""
        return self._counters("q")

    def _counters(self, kind: str) -> dict[int, dict[str, int]]:
        """The folded totals plus the entries not folded yet (at most TALLY_FOLD), read together
        so a fold in between cannot count an entry twice or not at all."""
        pipe = self.r.pipeline()  # MULTI: one consistent look
        pipe.hgetall(run_key(self.run_id, "usage" if kind == "u" else "quality"))
        pipe.lrange(run_key(self.run_id, "tally"), 0, -1)
        folded, pending = pipe.execute()
        totals = {k.decode(): int(v) for k, v in folded.items()}
        for entry in pending:
            if entry.startswith(b"m"):  # a move entry (``_MARK_AND_SETTLE``), no counter
                continue
            words = entry.decode().split("\t")
            for field, n in zip(words[::2], words[1::2], strict=False):
                if field.startswith(kind):
                    totals[field[1:]] = totals.get(field[1:], 0) + int(n)
        out: dict[int, dict[str, int]] = {}
        for k, v in totals.items():
            step, _, field = k.partition(":")
            out.setdefault(int(step), {})[field] = v
        return out

    def mark_failed(self, step: int, image_id: str, reason: str) -> None:
        self.r.hset(run_key(self.run_id, Outcome.FAILED, step), image_id, reason[:500])

    def mark_blocked(self, step: int, image_id: str, reason: str) -> None:
        self.r.hset(run_key(self.run_id, Outcome.BLOCKED, step), image_id, reason[:200])

    def fail_and_settle(self, step: int, image_id: str, reason: str, steps: list[int],
                        ordinal: int | None = None) -> bool:
        """``mark_failed`` and ``settle`` in one script (one round trip)."""
        return self._settle_script(image_id, steps, step, Outcome.FAILED, reason[:500], ordinal=ordinal)

    def block_and_settle(self, step: int, image_id: str, reason: str, steps: list[int],
                         ordinal: int | None = None) -> bool:
        """``mark_blocked`` and ``settle`` in one script (one round trip)."""
        return self._settle_script(image_id, steps, step, Outcome.BLOCKED, reason[:200], ordinal=ordinal)

    def clear_attempt(self, step: int, image_ids: Iterable[str], *, done: bool = False,
                      recheck: bool = False, ordinals: Iterable[int | None] = ()) -> None:
        """Forget failed/blocked marks (and done marks, for a forced redo) before an image-step is
        enqueued again, so status counts it as pending until its new outcome lands.

        ``recheck`` (``reprocess: changed``): done marks are moved to ``recheck:<step>`` instead,
        where the task finds the record it keeps when its fingerprint is current. Only images
        being enqueued are there, so it holds at most the window's (and moves, not copies).

        ``ordinals`` (with ``done``): the bits of these images are cleared too. A ``recheck``
        needs the offsets of the records it sets aside: the images' bits must have been turned
        back into done entries first (``producer.submit.unpack_bits``)."""
        ids = list(image_ids)
        if ids:
            pipe = self.r.pipeline()
            for kind in (Outcome.FAILED, Outcome.BLOCKED, *((Outcome.DONE,) if done else ())):
                pipe.hdel(run_key(self.run_id, kind, step), *ids)
            clear = [a for o in ordinals if o is not None for a in ("SET", "u1", o, 0)] if done else []
            if clear:
                pipe.execute_command("BITFIELD", run_key(self.run_id, BITS, step), *clear)
            if recheck and not done:
                self._move_entries(keys=[run_key(self.run_id, Outcome.DONE, step), run_key(self.run_id, RECHECK, step)],
                                   args=[1, *ids], client=pipe)
            pipe.execute()

    def iter_failed(self, step: int) -> Iterator[str]:
        for key, _ in self.r.hscan_iter(run_key(self.run_id, Outcome.FAILED, step)):
            yield key.decode()

    def counts(self, steps: Iterable[int]) -> dict[int, dict[str, int]]:
        """Per step, how many image-steps hold each mark: ``done`` is the done hash's entries
        plus the bitmap's set bits (``BITCOUNT``: a few ms at ten million images)."""
        pipe = self.r.pipeline()
        steps = list(steps)
        for s in steps:
            for kind in MARKS:
                pipe.hlen(run_key(self.run_id, kind, s))
            pipe.bitcount(run_key(self.run_id, BITS, s))
        values = iter(pipe.execute())
        out = {}
        for s in steps:
            per = {str(kind): next(values) for kind in MARKS}
            per[str(Outcome.DONE)] += next(values)
            out[s] = per
        return out

    def replace_done(self, step: int, pairs: Iterable[tuple[str, int]], still_there: Callable[[str, int], bool],
                     batch: int = 1000) -> int:
        """Make ``pairs`` the whole done index of ``step`` (a reindex), not an overlay: an entry
        whose record is gone must not stay done (the step's bits go too). Built into a temp
        hash and RENAMEd over the old one. A done mark a worker set during the rebuild (its line
        written after the sink was read) is carried over when it is newer than the rebuilt entry
        and ``still_there(image_id, offset)`` (its record is readable at that offset). Returns
        the entries written."""
        rebuild = self.rebuild_index([step], batch)
        for image_id, offset in pairs:
            rebuild.done(step, image_id, offset)
        return rebuild.commit({step: still_there})[step]

    def rebuild_index(self, steps: Iterable[int], batch: int = 1000) -> IndexRebuild:
        """Start a reindex of ``steps``: from now until its ``commit``, settling moves no image
        to the bitmaps (the rebuild could not carry a bit set meanwhile over)."""
        from worker.reindex import IndexRebuild  # it builds on RunState: imported when used

        return IndexRebuild(self, list(steps), batch)

    # -- images in flight (the producer's window) ----------------------------------------------
    def server_time(self) -> float:
        """Redis's clock, the one clock every host of the fleet shares."""
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def mark_queued(self, offsets: dict[str, int], ordinals: dict[str, int | None] | None = None) -> None:
        """Record images as in flight: ``image_id -> "<Redis time>:<seed offset>[:<ordinal>]"``.
        The time tells the reconciler how long an image has been in flight, the offset lets it
        publish the image again without reading the seed file, the ordinal (when known) lets
        it look at the image's done bits."""
        if offsets:
            stamp = int(self.server_time())
            ordinals = ordinals or {}

            def entry(image_id: str, offset: int) -> str:
                o = ordinals.get(image_id)
                return f"{stamp}:{offset}" if o is None else f"{stamp}:{offset}:{o}"

            self.r.hset(run_key(self.run_id, "queued"),
                        mapping={image_id: entry(image_id, offset) for image_id, offset in offsets.items()})

    def queued_ordinals(self, image_ids: list[str]) -> dict[str, int | None]:
        """The ordinals the in-flight marks of these images hold (None where none)."""
        if not image_ids:
            return {}
        out: dict[str, int | None] = {}
        for image_id, raw in zip(image_ids, self.r.hmget(run_key(self.run_id, "queued"), image_ids), strict=True):
            parts = raw.decode().split(":") if raw is not None else []
            out[image_id] = int(parts[2]) if len(parts) > 2 and parts[2] else None
        return out

    def queued_many(self, image_ids: list[str]) -> list[bool]:
        if not image_ids:
            return []
        return [v is not None for v in self.r.hmget(run_key(self.run_id, "queued"), image_ids)]

    def queued_count(self) -> int:
        return int(self.r.hlen(run_key(self.run_id, "queued")))

    def iter_queued(self) -> Iterator[tuple[str, float, int | None]]:
        """Every image in flight: ``(image_id, since, seed offset)``; ``since`` in Redis time
        (0 and no offset for marks written by an older producer, which stored the time only)."""
        for key, raw in self.r.hscan_iter(run_key(self.run_id, "queued"), count=1000):
            stamp, _, rest = raw.decode().partition(":")
            offset = rest.partition(":")[0]
            try:
                since = float(stamp)
            except ValueError:
                since = 0.0
            yield key.decode(), since, int(offset) if offset else None

    def unqueue(self, image_ids: list[str]) -> None:
        if image_ids:
            self.r.hdel(run_key(self.run_id, "queued"), *image_ids)

    def settle(self, image_id: str, steps: list[int], ordinal: int | None = None) -> bool:
        """Drop the image from the in-flight set once every step is done, failed or blocked.

        Called after a step's outcome is marked (or with the mark, in the same script); of two
        tasks settling together at least one sees both marks, so the image always leaves the
        set. A task whose canvas runs a later step after it does not settle (``finish``).
        """
        return self._settle_script(image_id, steps, ordinal=ordinal)

    def _settle_keys(self, steps: list[int]) -> list[str]:
        keys = [run_key(self.run_id, part) for part in ("queued", "tally", "usage", "quality", REINDEXING)]
        return keys + [run_key(self.run_id, kind, s) for s in steps for kind in (*MARKS, BITS)]

    def _settle_script(self, image_id: str, steps: list[int], step: int | None = None,
                       mark: Outcome | None = None, value: object = "", tally: str = "",
                       ordinal: int | None = None) -> bool:
        steps = list(steps)
        if step is not None and step not in steps:  # a step outside the run's list: mark it too
            steps.append(step)
        pos = steps.index(step) + 1 if step is not None else 0
        kind = MARKS.index(mark) + 1 if mark is not None else 0
        return bool(self._mark_and_settle(keys=self._settle_keys(steps),
                                          args=[image_id, pos, kind, value, tally, TALLY_FOLD,
                                                -1 if ordinal is None else ordinal]))

    def outcomes(self, image_ids: list[str], steps: list[int], ordinals: dict[str, int | None] | None = None
                 ) -> dict[str, dict[int, str | None]]:
        """``image_id -> step -> Outcome (DONE, FAILED or BLOCKED) | None`` in one round trip.
        An image whose ordinal is in ``ordinals`` is DONE in a step whose bit is set."""
        kinds = MARKS
        ordinals = ordinals or {}
        pipe = self.r.pipeline(transaction=False)
        for image_id in image_ids:
            ordinal = ordinals.get(image_id)
            for s in steps:
                for kind in kinds:
                    pipe.hexists(run_key(self.run_id, kind, s), image_id)
                if ordinal is not None:
                    pipe.getbit(run_key(self.run_id, BITS, s), ordinal)
        flags = iter(pipe.execute())
        out: dict[str, dict[int, str | None]] = {}
        for image_id in image_ids:
            per_step = {}
            for s in steps:
                marks = [next(flags) for _ in kinds]
                if ordinals.get(image_id) is not None and next(flags):
                    marks[0] = True
                per_step[s] = next((k for k, m in zip(kinds, marks, strict=True) if m), None)
            out[image_id] = per_step
        return out

    def settled_in(self, step: int, image_ids: list[str], ordinals: list[int | None] | None = None) -> list[bool]:
        """Whether each image's ``step`` holds a mark: a done entry or (ordinal known) its done bit,
        or a failed or blocked mark. One round trip of four commands whatever the number of
        images (three HMGETs and one BITFIELD GET), in a MULTI so that an image moving between
        the done hash and the bitmap meanwhile is seen in one or the other."""
        if not image_ids:
            return []
        known = [(i, o) for i, o in enumerate(ordinals or []) if o is not None]
        pipe = self.r.pipeline()  # MULTI: one consistent look
        for kind in MARKS:
            pipe.hmget(run_key(self.run_id, kind, step), image_ids)
        if known:
            pipe.execute_command("BITFIELD", run_key(self.run_id, BITS, step),
                                 *[a for _, o in known for a in ("GET", "u1", o)])
        raw = pipe.execute()
        settled = [any(v is not None for v in marks) for marks in zip(*raw[:len(MARKS)], strict=True)]
        for (i, _), bit in zip(known, raw[len(MARKS)] if known else [], strict=True):
            settled[i] = settled[i] or bool(bit)
        return settled

    def settle_many(self, image_ids: list[str], steps: list[int], ordinals: list[int | None] | None = None) -> int:
        """``settle`` for a batch in one round trip; returns how many left the in-flight set.

        The producer calls it right after marking a batch in flight, for the images whose last
        step is settled already (``settled_in``; ``enqueue.publish_chunk``): a worker that
        finished an image between its publish and that mark found nothing to drop, and would
        otherwise leave it "in flight" for ever (and the run never finished).
        """
        if not image_ids:
            return 0
        keys = self._settle_keys(list(steps))
        ords = [-1 if o is None else o for o in (ordinals or [None] * len(image_ids))]
        try:
            return self._settle_batch(keys, image_ids, ords)
        except redis.exceptions.NoScriptError:
            # Redis restarted between the pipeline's script load and its EVALSHAs (the
            # connection retry re-sent them to an empty server): a new pipeline loads the script
            # again. Settling is idempotent, so running the batch twice is safe.
            return self._settle_batch(keys, image_ids, ords)

    def _settle_batch(self, keys: list[str], image_ids: list[str], ordinals: list[int]) -> int:
        pipe = self.r.pipeline(transaction=False)
        for image_id, ordinal in zip(image_ids, ordinals, strict=True):
            self._mark_and_settle(keys=keys, args=[image_id, 0, 0, "", "", TALLY_FOLD, ordinal], client=pipe)
        return sum(int(x) for x in pipe.execute())

    # -- fleet ---------------------------------------------------------------------------------
    def heartbeat(self, worker: str) -> None:
        self.r.zadd(run_key(self.run_id, "workers"), {worker: time.time()})

    def workers_seen(self, window: float = WORKER_SEEN_WINDOW) -> list[str]:
        since = time.time() - window
        return [w.decode() for w in self.r.zrangebyscore(run_key(self.run_id, "workers"), since, "+inf")]


def _tally(step: int, call: dict | None, quality: dict | None) -> str:
    """One task's usage (``u``) and quality (``q``) counters as one tally entry:
    ``"<u|q><step>:<field>\t<n>\t..."``, zero counts left out."""
    parts: list[tuple[str, int]] = []
    if call:
        parts.append((f"u{step}:calls", 1))
        parts += [(f"u{step}:{f}", int(call[f])) for f in (*USAGE_FIELDS, *BATCH_USAGE_FIELDS) if call.get(f)]
        parts.append((f"u{step}:latency_ms", round(float(call.get("latency_s") or 0) * 1000)))
    if quality:
        parts.append((f"q{step}:images", 1))
        for field, value in quality.items():
            if isinstance(value, bool):
                if value:
                    parts.append((f"q{step}:{field}", 1))
            elif isinstance(value, int) and value:
                parts.append((f"q{step}:{field}", value))
        parts += [(f"q{step}:repair:{kind}", int(n)) for kind, n in (quality.get("repairs") or {}).items()]
        parts += [(f"q{step}:{f}:{quality[f]}", 1) for f in ("mode", "fallback") if quality.get(f)]
    return "\t".join(f"{k}\t{n}" for k, n in parts)
