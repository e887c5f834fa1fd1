"""Provider batch mode: what submitting a job and reading its answers cost the submitting worker.

Builds ``--requests`` requests over one image of ``--fmt`` (bench.common.make_dataset's images),
submits them as one job through each provider backend (``GeminiBatch`` as an uploaded file or
inline, ``OpenAIBatch`` as a file) against the fake endpoint in its own process, polls the job
once (the fake answers it then) and reads its answers. Prints this process's CPU per request for
the submit (request bodies, base64, JSON lines, upload) and for reading the answers: the
endpoint's own work is not in it. Wall times include the fake, which parses every line and
decodes every image on the same cores, and say little about a real provider.

    .venv/bin/python -m bench.batchsubmit --requests 200 --fmt png
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.common import banner, emit_json, fake_vlm, make_dataset


def _run(label: str, backend, items) -> dict:
    keys = [i.key for i in items]
    c0, w0 = time.process_time(), time.monotonic()
    job = backend.submit(items, display_name="bench")
    c1, w1 = time.process_time(), time.monotonic()
    state = backend.status(job).state
    c2 = time.process_time()
    answers = sum(1 for _, a in backend.results(job, expected_keys=keys) if not isinstance(a, Exception))
    c3 = time.process_time()
    row = {"backend": label, "requests": len(items), "state": state, "answers": answers,
           "submit_cpu_ms_per_request": round((c1 - c0) / len(items) * 1000, 2),
           "submit_wall_s": round(w1 - w0, 2),
           "results_cpu_ms_per_request": round((c3 - c2) / len(items) * 1000, 3)}
    print(f"{label:14} {len(items)} requests: submit {row['submit_cpu_ms_per_request']:.2f} ms CPU/request "
          f"({row['submit_wall_s']:.1f} s wall with the fake), results {row['results_cpu_ms_per_request']:.3f} "
          f"ms CPU/request, {answers} answers, job {state}")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.batchsubmit", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--fmt", choices=("jpg", "png", "small", "big"), default="png")
    p.add_argument("--work", default="/tmp/refexp-bench-batchsubmit")
    p.add_argument("--json", default=None, help="append the figures as JSON lines to this file")
    a = p.parse_args(argv)

    from worker.clients.base import VLMRequest
    from worker.clients.batch import BatchItem
    from worker.clients.gemini_batch import GeminiBatch
    from worker.clients.openai_batch import OpenAIBatch
    from worker.images import load_payload
    from worker.spec import GeminiSpec, OpenAISpec

    m = banner("provider batch jobs: submit and results CPU", requests=a.requests, fmt=a.fmt)
    images, _ = make_dataset(Path(a.work), 1, fmt=a.fmt)
    payload = load_payload(next(p for p in sorted(images.iterdir()) if p.is_file()))
    print(f"image: {len(payload.data)} bytes ({payload.mime})")
    items = [BatchItem(f"img{i}:step1", VLMRequest(image=payload, prompt="Describe this image in one sentence."))
             for i in range(a.requests)]
    os.environ.setdefault("GOOGLE_API_KEY", "bench-key")
    rows = []
    with fake_vlm(0.0) as fake:
        gemini = GeminiSpec(base_url=fake.url, timeout=600)
        rows.append(_run("gemini file", GeminiBatch(gemini, inline_max_bytes=1), items))
        rows.append(_run("gemini inline", GeminiBatch(gemini, inline_max_bytes=10**12), items))
        rows.append(_run("openai file", OpenAIBatch(OpenAISpec(base_url=fake.url + "/v1", timeout=600,
                                                               model_name="bench")), items))
    emit_json(a.json, {"bench": "batchsubmit", "machine": m, "rows": rows})


if __name__ == "__main__":
    main()
