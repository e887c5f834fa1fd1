"""Tokens and cost: what a run's calls used, summed live (Redis) or from the sinks (the truth),
priced with ``vlm.prices``."""

from __future__ import annotations

from collections.abc import Iterable

from producer.extsort import SortedPairs, last_per_key
from worker.layout import Layout
from worker.runstate import BATCH_USAGE_FIELDS, USAGE_FIELDS, RunState
from worker.steps.records import PIPELINE_NAMES

# ``call_sums`` spells these out (it runs once per line of every step sink at finalize).
assert USAGE_FIELDS == ("input_tokens", "output_tokens", "image_tokens", "thinking_tokens")


def run_prices(state: RunState, meta: dict | None = None) -> dict | None:
    """The run's ``vlm.prices`` from the spec stored in Redis (None when there is none)."""
    meta = state.meta() if meta is None else meta
    spec = state.load_spec(meta["spec_hash"]) if meta.get("spec_hash") else None
    return (((spec or {}).get("image_referring_expression") or {}).get("vlm") or {}).get("prices")


# --------------------------------------------------------------------------- tokens and cost


#: The part of a call's tokens that a provider batch job answered (billed at the batch price).
BATCH_FIELDS = BATCH_USAGE_FIELDS


def call_cost(prices: dict | None, input_tokens: int, output_tokens: int, thinking_tokens: int = 0, *,
              batch_input_tokens: int = 0, batch_output_tokens: int = 0, batch_thinking_tokens: int = 0
              ) -> float | None:
    """What the tokens cost under ``vlm.prices``; None when there is no price table.

    Image tokens are part of ``input_tokens`` (every API counts them in the prompt), and
    thinking tokens are billed as output. The ``batch_*`` tokens are the part of those totals
    that provider batch jobs answered: they cost ``vlm.prices.batch_factor`` of the online price
    (0.5 when the table has no factor).
    """
    if not prices:
        return None
    pin, pout = float(prices.get("input_per_million") or 0), float(prices.get("output_per_million") or 0)
    if not pin and not pout:
        return None
    factor = float(prices.get("batch_factor", 0.5) if prices.get("batch_factor") is not None else 0.5)
    online = ((input_tokens - batch_input_tokens) * pin
              + (output_tokens + thinking_tokens - batch_output_tokens - batch_thinking_tokens) * pout)
    batch = (batch_input_tokens * pin + (batch_output_tokens + batch_thinking_tokens) * pout) * factor
    return (online + batch) / 1e6


def usage_summary(per_step: dict[int, dict], prices: dict | None = None) -> dict:
    """Totals and per-image / per-call averages from ``step -> {images, calls, <tokens>, latency_s}``.

    ``images`` is how many images have a record for the step (those with no boxes made no call,
    and count with 0 tokens in the per-image average).
    """

    def finish(c: dict) -> dict:
        images, calls = c.get("images", 0), c.get("calls", 0)
        out = {"images": images, "calls": calls, **{f: c.get(f, 0) for f in USAGE_FIELDS},
               "latency_s": round(c.get("latency_s", 0.0), 3)}
        for f in ("input_tokens", "output_tokens"):
            out[f"{f}_per_image"] = round(out[f] / images, 1) if images else None
        out["latency_s_per_call"] = round(out["latency_s"] / calls, 3) if calls else None
        batch = {f: int(c.get(f) or 0) for f in BATCH_FIELDS if c.get(f)}
        out.update(batch)  # only when batch jobs answered some of the calls
        cost = call_cost(prices, out["input_tokens"], out["output_tokens"], out["thinking_tokens"], **batch)
        if cost is not None:
            out["cost"] = round(cost, 6)
            out["cost_per_image"] = round(cost / images, 6) if images else None
        return out

    steps = {str(s): finish(c) for s, c in sorted(per_step.items())}
    total: dict = {"images": max((c["images"] for c in steps.values()), default=0)}
    for f in ("calls", *USAGE_FIELDS, "latency_s"):
        total[f] = sum(c[f] for c in steps.values())
    for f in BATCH_FIELDS:
        if any(c.get(f) for c in steps.values()):
            total[f] = sum(c.get(f, 0) for c in steps.values())
    return {"steps": steps, "total": finish(total)}


def usage_from_sinks(layout: Layout, steps: list[int], prices: dict | None = None) -> dict:
    """Token usage per step from the step sinks (the record of every call that succeeded).

    Every valid line counts as a call made (a forced re-run or a re-delivered task is a call paid
    for); ``images`` counts distinct image ids. Calls whose answer could not be parsed left no
    record and are not counted.
    """
    per_step: dict[int, dict] = {}
    for s in steps:
        sink = layout.sink(s)
        c = call_counts(sink.scan(), s)
        with SortedPairs((rec["image_id"], 0) for _, rec in sink.scan()) as ids:  # distinct, in bounded memory
            images = sum(1 for _ in last_per_key(ids))
        for f, v in sink.carried_usage().items():  # calls whose lines a finalize merged away
            if f in c or f in BATCH_FIELDS:
                c[f] = c.get(f, 0) + v
        per_step[s] = {"images": images, **c}
    return usage_summary(per_step, prices)


def call_counts(records: Iterable[tuple[int, dict]], step: int) -> dict:
    """Calls, tokens and latency summed over a step's records."""
    return call_sums(call_of(rec, step) for _, rec in records)


def call_of(record: dict, step: int) -> dict | None:
    """The ``call`` entry of ``step``'s meta in a record (None when it made no call)."""
    return ((record.get("meta") or {}).get(PIPELINE_NAMES[step]) or {}).get("call")


def call_sums(entries: Iterable[dict | None]) -> dict:
    """``call_counts`` over the ``call`` entries alone (``call_of``): finalize keeps only these
    of a batch of lines, not the whole records (holding thousands of parsed records costs
    more in cache misses than parsing them)."""
    c: dict = {"calls": 0, **dict.fromkeys(USAGE_FIELDS, 0), "latency_s": 0.0}
    # Sums in local variables, the fields spelt out: finalize runs this over every line of every
    # step sink. The latency is summed in the same order as ever, so the float total is the same.
    calls, inp, out, image, thinking, latency = 0, 0, 0, 0, 0, 0.0
    batch_keys = frozenset(BATCH_FIELDS)
    for call in entries:
        if not call:
            continue
        get = call.get
        calls += 1
        inp += int(get("input_tokens") or 0)
        out += int(get("output_tokens") or 0)
        image += int(get("image_tokens") or 0)
        thinking += int(get("thinking_tokens") or 0)
        if not batch_keys.isdisjoint(call):  # one look for the three fields most calls lack
            for f in BATCH_FIELDS:
                if get(f):
                    c[f] = c.get(f, 0) + int(call[f])
        latency += float(get("latency_s") or 0)
    c.update(calls=calls, input_tokens=inp, output_tokens=out, image_tokens=image, thinking_tokens=thinking,
             latency_s=latency)
    return c


def format_usage(usage: dict) -> list[str]:
    """Human lines for a ``usage_summary``: per step and total, tokens and per-image averages."""

    def line(label: str, c: dict) -> str:
        text = (f"  {label:<7} {c['calls']:>7} calls  in {c['input_tokens']:>11,}  out {c['output_tokens']:>10,}")
        if c["images"]:
            text += f"  per image: in {c['input_tokens_per_image']:,.0f}, out {c['output_tokens_per_image']:,.0f}"
        extras = [f"{f.split('_')[0]} {c[f]:,}" for f in ("image_tokens", "thinking_tokens") if c.get(f)]
        if c.get("batch_input_tokens"):
            extras.append(f"batch-priced in {c['batch_input_tokens']:,}")
        if c.get("latency_s_per_call") is not None and label != "total":
            extras.append(f"{c['latency_s_per_call']:.2f} s/call")
        if "cost" in c:
            extras.append(f"cost {c['cost']:,.4f}" + (f" ({c['cost_per_image']:.6f}/image)" if c.get("cost_per_image")
                                                     is not None else ""))
        return text + (f"  [{', '.join(extras)}]" if extras else "")

    lines = ["  tokens (calls that succeeded):"]
    lines += [line(f"step {s}", c) for s, c in usage["steps"].items()]
    lines.append(line("total", usage["total"]))
    return lines
