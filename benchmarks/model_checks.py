"""What it costs a site to check the aggregate it trains from (issue: crafted-weights leak).

Every site now derives its model from the previous aggregate and verifies it first. Per mode,
for one site and one round, against a baseline measured in the same run:

- plain: verify every member's Ed25519-signed update and add them up, vs adding unsigned
  vectors (what the orchestrator did before);
- paillier: verify the key authority's signature on the decrypted sum, vs decoding the sum;
- secagg: check every survivor's signed masked input and form the masked sum *itself*
  before opening it, vs opening a sum the orchestrator formed.

Then the demo job (3 sites, real site code, no syft transport) with the checks on: median
round, so the check's share of a round is visible. Prints a table and writes
``benchmarks/results/model_checks.json``.
Usage: ``python benchmarks/model_checks.py [--repeats 20] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path
from statistics import median

import numpy as np

from fed_tasks.codec import decode_array, encode_array
from privacy import signing
from privacy.secagg import default_threshold
from privacy.secagg_session import SecAggSessionClient, SecAggSessionServer

RESULTS = Path(__file__).parent / "results" / "model_checks.json"


def _timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return median(out)


def plain_cost(n_sites: int, length: int, repeats: int) -> tuple[float, float]:
    keys = {f"s{i}": signing.generate_signing_key() for i in range(n_sites)}
    pubs = {s: signing.public_key_to_str(k) for s, k in keys.items()}
    vectors = [np.random.default_rng(i).normal(size=length) for i in range(n_sites)]
    signed = [signing.SignedContribution.create(k, s, "job", 1, encode_array(v), model="m")
              for (s, k), v in zip(keys.items(), vectors, strict=True)]
    texts = [c.to_str() for c in signed]
    payloads = [c.payload for c in signed]

    def checked() -> np.ndarray:
        total = np.zeros(length)
        for t in texts:
            c = signing.SignedContribution.from_str(t)
            c.verify(pubs[c.site_id])
            total += decode_array(c.payload, length)
        return total

    def unchecked() -> np.ndarray:
        return np.sum([decode_array(p, length) for p in payloads], axis=0)

    return _timed(checked, repeats), _timed(unchecked, repeats)


def paillier_cost(length: int, repeats: int) -> tuple[float, float]:
    key = signing.generate_signing_key()
    pub = signing.public_key_to_str(key)
    payload = encode_array(np.random.default_rng(0).normal(size=length))
    att = signing.SignedAggregate.create(key, "job", 1, ["a", "b", "c"], "m", payload).to_str()

    def checked() -> np.ndarray:
        signing.SignedAggregate.from_str(att).verify(pub, payload)
        return decode_array(payload, length)

    return _timed(checked, repeats), _timed(lambda: decode_array(payload, length), repeats)


def secagg_cost(n_sites: int, length: int, repeats: int) -> tuple[float, float]:
    """One round of a real session; site s0 opens it both ways (fresh state each time)."""
    sites = [f"s{i}" for i in range(n_sites)]
    t, bits, job = default_threshold(n_sites), 64, secrets.token_hex(4)
    server = SecAggSessionServer(t, bits, length, job, 1, sites=sites)
    clients = {s: SecAggSessionClient(s, job_id=job, threshold=t, bits=bits,
                                      vector_length=length, rounds=1) for s in sites}
    directory = server.collect_keys([c.advertise() for c in clients.values()])
    server.route_shares([c.share(directory) for c in clients.values()])
    x = np.random.default_rng(0).integers(0, 2**40, size=length, dtype=np.uint64)
    masked = {s: c.masked_input(1, x, server.inbox(s)) for s, c in clients.items()}
    server.collect_masked(1, list(masked.values()))
    formed = server.masked_sum(1).to_str()
    keys = {s: signing.generate_signing_key() for s in sites}
    pubs = {s: signing.public_key_to_str(k) for s, k in keys.items()}
    signed = [signing.SignedContribution.create(keys[s], s, job, 0, m.to_str(), model="m"
                                                ).to_str() for s, m in masked.items()]
    state = clients["s0"].export_state()

    def checked() -> None:
        client = SecAggSessionClient.from_state(state)
        inputs = []
        for text in signed:
            c = signing.SignedContribution.from_str(text)
            c.verify(pubs[c.site_id])
            inputs.append(c.payload)
        client.open_round(inputs)

    def unchecked() -> None:
        SecAggSessionClient.from_state(state).open_sum(formed)

    return _timed(checked, repeats), _timed(unchecked, repeats)


def demo_rounds(rounds: int) -> dict[str, float]:
    """Median round of the demo job with the real site code (checks on), per mode."""
    import tempfile

    from datasites.harness.demo import BUNDLED_TABLE, DemoConfig, partition
    from datasites.runtime.direct import direct_federation
    from datasites.runtime.tables import infer_schema, read_table
    from fed_tasks.aggregation import MaskedSum, PlainSum
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    frame = read_table(BUNDLED_TABLE)
    schema = infer_schema(frame, "anomaly")
    splits = partition(frame, schema, DemoConfig())
    out = {}
    for mode in ("plain", "secagg"):
        spec = JobSpec(features=schema.features, label_column="anomaly", rounds=rounds,
                       aggregation=mode)
        with tempfile.TemporaryDirectory() as root:
            sites = direct_federation(root, spec, {f"site-{i + 1}": s
                                                   for i, s in enumerate(splits)})
            agg = MaskedSum(spec, len(sites)) if mode == "secagg" else PlainSum(2)
            result = FederatedTrainer(spec, sites, secure_sum=agg, progress=False).fit()
            for s in sites:
                s.close()
        out[mode] = float(median(result.round_seconds[1:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    print(f"{'mode':9}{'params':>9}{'sites':>7}{'check (ms)':>13}{'baseline (ms)':>15}"
          f"{'extra (ms)':>12}")
    for length in (1_839, 10_000, 100_000):
        for n in (3, 5, 10):
            for mode, (checked, base) in (("plain", plain_cost(n, length, args.repeats)),
                                          ("secagg", secagg_cost(n, length, args.repeats))):
                rows.append({"mode": mode, "params": length, "sites": n,
                             "check_s": checked, "baseline_s": base})
                print(f"{mode:9}{length:>9}{n:>7}{checked * 1e3:>13.2f}{base * 1e3:>15.2f}"
                      f"{(checked - base) * 1e3:>12.2f}")
        checked, base = paillier_cost(length, args.repeats)
        rows.append({"mode": "paillier", "params": length, "sites": None,
                     "check_s": checked, "baseline_s": base})
        print(f"{'paillier':9}{length:>9}{'any':>7}{checked * 1e3:>13.2f}{base * 1e3:>15.2f}"
              f"{(checked - base) * 1e3:>12.2f}")
    demo = demo_rounds(args.rounds)
    print("demo job (1,839 params, 3 sites, real site code, checks on): median round "
          + ", ".join(f"{m} {s:.3f} s" for m, s in demo.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"checks": rows, "demo_round_s": demo,
                                   "repeats": args.repeats, "rounds": args.rounds}, indent=2))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
