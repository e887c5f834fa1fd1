"""The Redis result backend, minus the result tracking the producer cannot afford.

The producer publishes a chord per image and never waits on a result: outcomes live in the sinks
and the run index. Celery's Redis backend still tracks, in the *sending* process, every result it
could be asked to wait for:

- ``on_task_call`` subscribes the sender to a pub/sub channel for every task it sends, so that
  ``AsyncResult.get()`` can be woken (celery issue 3808);
- ``add_pending_result`` keeps each chord-header result as *pending*, registered when the chord
  builds its ``GroupResult`` ready barrier, and subscribes to its channel as well.

At 100k images that was 489 MB of producer RSS (4 KB per image, never released), a publish rate
40% lower, and two pub/sub subscriptions per image in Redis for as long as the producer stayed
connected (bench/README.md, target 4). This backend keeps neither. Chord counting and result
storage, which workers do, are unchanged. The cost: ``AsyncResult.get()`` cannot be woken in a
process using this backend; nothing in refexp calls it.

Chord counting runs a leaner copy of Celery's part-return script (``CHORD_PART_RETURN_LUA``,
celery/backends/redis.py, 5.7: the same keys, arguments and answer). Celery's script runs 12
commands per header task: it checks the task's membership and then adds it (SISMEMBER, SADD),
and refreshes the expiry of five keys every time, two of which refexp never creates (the
``.t`` counter of tasks added to a running chord, the saved complex header). This one adds and
checks in one SADD, and sets the expiry of the keys it creates once, when it creates them (the
size key got its expiry when the chord was published): 7 commands per header task, 9 for the
first (bench/redis_cost.py). pyproject.toml pins Celery below 5.8: an upgrade must compare
this script with Celery's again (tests/worker/test_backend.py drives it as a worker does).
"""

from __future__ import annotations

from functools import cached_property, partial

from celery.backends.redis import RedisBackend

CHORD_PART_RETURN_LUA = """
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires = tonumber(ARGV[5])
local claim_expires = tonumber(ARGV[7])
local claim_token = ARGV[8]

if redis.call('GET', ckey) == 'done' then
    return {-1, 0, 0, 0}
end
local added = redis.call('SADD', dkey, tid .. ':' .. score)
if added == 1 then
    if ordered == '1' then
        redis.call('ZADD', jkey, score, value)
    else
        redis.call('RPUSH', jkey, value)
    end
end
local readycount
if ordered == '1' then
    readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
else
    readycount = redis.call('LLEN', jkey)
end
if expires > 0 and added == 1 and readycount == 1 then
    redis.call('EXPIRE', jkey, expires)
    redis.call('EXPIRE', dkey, expires)
end

local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end

return {readycount, totaldiff, size, claimed}
"""


class RefexpRedisBackend(RedisBackend):
    def on_task_call(self, producer, task_id):
        return None

    def add_pending_result(self, result, weak=False, start_drainer=True):
        return result

    def on_chord_part_return(self, request, state, result, propagate=None, **kwargs):
        """Count a header task into its chord, riding out a Redis connection lost on the way
        with the backend's retry policy (about 20 s).

        The header tasks store no result, so this is their first write to the result backend:
        Celery runs it unretried, and a connection reset there raised out of the task after its
        record was committed ("exception raised outside body"), leaving the chord one count
        short and the image waiting for the reconciler. Storing the result used to absorb the
        outage first (``RedisBackend.set`` goes through ``ensure``). A retry cannot count twice:
        the script adds the task to the chord's set once (SADD) and the body is claimed once."""
        count = partial(super().on_chord_part_return, propagate=propagate, **kwargs)
        return self.ensure(count, (request, state, result))

    @cached_property
    def _chord_part_return_script(self):
        return self.client.register_script(CHORD_PART_RETURN_LUA)
