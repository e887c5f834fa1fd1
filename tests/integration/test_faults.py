import json
from tests.support.fleet import producer, wait_until
from tests.integration.test_fleet import openai_args
import redis

def test_debug(fleet, fleet_env, fake_vlm, demo_data, tmp_path, redis_client):
    fleet.start(2)
    results = tmp_path / "results"
    producer(fleet_env, "enqueue", *openai_args(fake_vlm, results, demo_data), "--wait", "--timeout", "100")
    p = producer(fleet_env, "enqueue", *openai_args(fake_vlm, results, demo_data,
        "image_referring_expression.workflow.force_reprocess=true"), "--timeout", "100")
    import time; time.sleep(15)
    st = json.loads(producer(fleet_env, "status", "--results-dir", str(results), "--json").stdout)
    print(json.dumps(st, indent=1))
    for k in redis_client.keys("refexp:run:*queued*"):
        print(k, redis_client.hgetall(k))
    assert 0
