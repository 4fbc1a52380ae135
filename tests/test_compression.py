"""Compressed training updates (fed_tasks/compression.py): the payloads and their strict
decoding, error feedback, the spec's rules, and jobs through the real site code (plain
q8 against no compression; secure q16 sends fewer bytes than today's encoding)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from datasites.runtime.direct import direct_federation
from datasites.runtime.federation_config import load_site_keys
from fed_tasks import compression
from fed_tasks.aggregation import MaskedSum, PlainSum
from fed_tasks.codec import PayloadError, encode_array
from fed_tasks.encoding import secagg_plan
from fed_tasks.interface import SiteRefusedError
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.schedule import fit_codec, vector_length
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution

RNG = np.random.default_rng(0)
VECTOR = np.concatenate([RNG.normal(0, 50, 500), [123.456, 4000.0]])  # [n·Δ, n·loss, n]


@pytest.mark.parametrize("setting", ["none", "q16", "q8", "topk:40", "topk:9999"])
def test_each_encoding_round_trips_and_keeps_loss_and_count_exact(setting):
    payload = compression.encode(setting, VECTOR)
    got = compression.decode(setting, payload, VECTOR.size)
    assert got[-2:].tolist() == VECTOR[-2:].tolist()
    head, want = got[:-2], VECTOR[:-2]
    kind = compression.parse(setting)
    if kind.kind in ("q8", "q16"):
        step = np.ptp(want) / ((1 << compression.BITS[kind.kind]) - 1)
        assert np.max(np.abs(head - want)) <= step / 2 + 1e-9
    elif kind.kind == "topk":
        kept = np.flatnonzero(head)
        assert len(kept) == min(kind.k, want.size)
        assert np.min(np.abs(want[kept])) >= np.max(np.abs(np.delete(want, kept)), initial=0)
        np.testing.assert_allclose(head[kept], want[kept], rtol=1e-6)
    else:
        assert got.tolist() == VECTOR.tolist()
    assert payload == compression.encode(setting, VECTOR)  # deterministic
    sizes = {s: len(compression.encode(s, VECTOR)) for s in ("none", "q16", "q8")}
    assert sizes["q8"] < sizes["q16"] < sizes["none"] / 3


def _raw(setting: str, mutate) -> str:
    import base64

    raw = bytearray(base64.b64decode(compression.encode(setting, VECTOR)))
    mutate(raw)
    return base64.b64encode(bytes(raw)).decode()


def _put(offset: int, value: bytes):
    def mutate(raw: bytearray) -> None:
        raw[offset:offset + len(value)] = value
    return mutate


@pytest.mark.parametrize(("setting", "payload", "needle"), [
    ("q8", "not base64!", "not valid base64"),
    ("q8", lambda: _raw("q8", lambda r: r.extend(b"\0")), "bytes, expected"),
    ("q16", lambda: _raw("q16", lambda r: r.__delitem__(slice(-2, None))), "bytes, expected"),
    ("q8", lambda: _raw("q8", _put(16, np.array([np.nan]).tobytes())), "non-finite"),
    ("q8", lambda: _raw("q8", _put(24, np.array([-1.0]).tobytes())), "negative scale"),
    ("q8", lambda: _raw("q8", _put(24, np.array([1e308]).tobytes())), "NaN or infinity"),
    ("topk:3", lambda: _raw("topk:3", _put(16 + 8, np.array([500], "<u4").tobytes())),
     "stay below 500"),
    ("topk:3", lambda: _raw("topk:3", _put(16 + 4, np.array([0, 0], "<u4").tobytes())),
     "increase strictly"),
    ("topk:3", lambda: _raw("topk:3", _put(16 + 12, np.array([np.inf], "<f4").tobytes())),
     "NaN or infinity"),
    ("topk:3", lambda: encode_array(VECTOR), "bytes, expected"),  # an uncompressed update
])
def test_decoding_is_strict_with_one_line_errors(setting, payload, needle):
    text = payload() if callable(payload) else payload
    with pytest.raises(PayloadError, match=needle) as err:
        compression.decode(setting, text, VECTOR.size)
    assert "\n" not in str(err.value)


def test_error_feedback_delays_what_compression_drops_never_loses_it():
    spec = JobSpec(features=("a",), compress="topk:5")
    private: dict[str, np.ndarray] = {}
    updates = [np.concatenate([RNG.normal(size=50), [1.0, 10.0]]) for _ in range(6)]
    sent = [compression.compress_fit(spec, u, 0.0, private)[0] for u in updates]
    total_in = np.sum([u[:-2] for u in updates], axis=0)
    total_out = np.sum([s[:-2] for s in sent], axis=0)
    np.testing.assert_allclose(total_out + private[compression.RESIDUAL], total_in,
                               atol=1e-5)  # top-k values travel as float32
    assert all(np.count_nonzero(s[:-2]) == 5 for s in sent)


def test_secure_codecs_fit_16_and_8_bits_and_topk_is_plain_only():
    for setting, bits in (("q16", 16), ("q8", 8)):
        spec = JobSpec(features=("a",), aggregation="paillier", compress=setting)
        assert fit_codec(spec).bits_per_value(1) == bits
    assert fit_codec(JobSpec(features=("a",), aggregation="paillier")).bits_per_value(1) == 42
    for mode in ("paillier", "secagg"):
        with pytest.raises(ValidationError, match="a secure sum needs dense vectors"):
            JobSpec(features=("a",), aggregation=mode, compress="topk:10")
    for bad, needle in (("zip", "must be none, q8, q16 or topk:K"),
                        ("topk:", "must be none"), ("q32", "must be none")):
        with pytest.raises(ValidationError, match=needle):
            JobSpec(features=("a",), compress=bad)
    with pytest.raises(ValidationError, match="no training rounds"):
        JobSpec(features=("a",), model="hbos", compress="q8")
    auto = JobSpec(features=("a",), model="auto", candidates=("ae", "pca"), compress="q8")
    assert [c.compress for c in auto.candidate_specs] == ["q8", "none"]
    from datasites.harness.demo import encoding_problems

    # a compressed secure update carries the share n/N, not n: any row count fits
    assert encoding_problems(JobSpec(features=("a",), aggregation="secagg", compress="q8"),
                             20_000_000) == []


def _direct_job(root, partitions, schema, **fields):
    """A job through the sites' real entry point (no syft transport): its spec, result and
    the sites' mean ROC-AUC on their test splits."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=3, **fields)
    frames = {f"site-{i}": part for i, part in enumerate(partitions)}
    sites = direct_federation(root, spec, frames)
    try:
        secure = MaskedSum(spec, len(sites)) if spec.aggregation == "secagg" else None
        trainer = FederatedTrainer(spec, sites, progress=False, secure_sum=secure)
        result = trainer.fit()
        aucs = [e["roc_auc"] for e in trainer.evaluate(result)]
    finally:
        for s in sites:
            s.close()
    return spec, result, float(np.mean(aucs))


def test_plain_q8_trains_like_uncompressed_through_the_site_code(tmp_path, partitions,
                                                                 schema):
    """Real shuttle rows, the sites' real entry point: each site decodes the others' q8
    payloads itself, and keeps its residual in its private job state."""
    _, plain, auc = _direct_job(tmp_path / "none", partitions, schema)
    spec, q8, auc_q8 = _direct_job(tmp_path / "q8", partitions, schema, compress="q8")
    assert auc > 0.9 and abs(auc - auc_q8) < 0.01, (auc, auc_q8)
    assert q8.bytes_per_site_round < plain.bytes_per_site_round / 5
    assert len(q8.sent) == 3 * 3 and {s["round"] for s in q8.sent} == {1, 2, 3}
    saved = json.loads((tmp_path / "q8" / "site-0" / f"model_{spec.job_id}.json").read_text())
    assert set(saved["private"]) == {compression.RESIDUAL}  # survives a restart, never sent


def test_a_member_signing_a_malformed_compressed_update_is_refused_by_the_others(
        tmp_path, partitions, schema):
    """A member may sign any payload; every other site decodes it itself, strictly, and
    refuses the aggregate in one line before training from it."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2,
                   compress="topk:5")
    sites = direct_federation(tmp_path, spec, {f"site-{i}": p for i, p in enumerate(partitions)})
    try:
        agg = PlainSum(spec.min_sites, spec)
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        agg.submit(sites, "fit", {"round": 1, "previous": agg.evidence()},
                   vector_length(spec, "fit"))
        evidence = dict(agg.evidence() or {})
        first = SignedContribution.from_str(evidence["contributions"][0])
        raw = bytearray(base64.b64decode(first.payload))
        raw[16 + 16:16 + 20] = np.array([10**6], "<u4").tobytes()  # the last top-k index
        keys = load_site_keys(tmp_path / first.site_id, first.site_id)
        forged = SignedContribution.create(keys.signing_key, first.site_id, spec.job_id,
                                           first.round, base64.b64encode(raw).decode(),
                                           model=first.model)
        evidence["contributions"] = [forged.to_str(), *evidence["contributions"][1:]]
        other = next(s for s in sites if s.name != first.site_id)
        with pytest.raises(SiteRefusedError, match="holds no valid vector: top-k indices") as e:
            other.call("fit", {"round": 2, "previous": evidence})
        assert "\n" not in str(e.value)
    finally:
        for s in sites:
            s.close()


def test_secagg_q16_round_sends_fewer_bytes_and_still_trains(tmp_path, partitions, schema):
    """Each session round masks modulo its own phase's width, so a 16-bit training round is
    smaller than today's (which took the 52-bit statistics' width, 7 bytes per value)."""
    spec, default, auc = _direct_job(tmp_path / "none", partitions, schema,
                                     aggregation="secagg")
    spec16, q16, auc16 = _direct_job(tmp_path / "q16", partitions, schema,
                                     aggregation="secagg", compress="q16")
    plan, plan16 = secagg_plan(spec, 3), secagg_plan(spec16, 3)
    assert plan["bits"] == plan16["bits"] == 55  # the statistics round
    assert plan["round_bits"][1] == 43 and plan16["round_bits"][1] == 18
    assert q16.bytes_per_site_round < 0.55 * default.bytes_per_site_round
    length = plan["vector_length"]
    assert default.bytes_per_site_round < 4 / 3 * 7 * length  # below today's 7 bytes/value
    assert abs(auc - auc16) < 0.01 and auc16 > 0.9, (auc, auc16)
    assert sum(s["clipped"] for s in q16.sent) == 0


def test_paillier_q16_packs_more_values_per_ciphertext(federation, schema):
    """Through real PySyft datasites and the key authority: fewer bits per value, more
    values per Paillier plaintext, fewer bytes per round."""
    sizes, aucs = {}, {}
    for setting in ("none", "q16"):
        spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2,
                       aggregation="paillier", compress=setting)
        federation.approve_all(federation.submit(spec))
        trainer = federation.trainer(spec, progress=False)
        result = trainer.fit()
        sizes[setting] = result.bytes_per_site_round
        aucs[setting] = np.mean([e["roc_auc"] for e in trainer.evaluate(result)])
    assert sizes["q16"] < 0.6 * sizes["none"], sizes
    assert aucs["q16"] > 0.9 and abs(aucs["q16"] - aucs["none"]) < 0.01, aucs


def test_submit_refuses_a_bad_compress_in_one_line_naming_the_flag(tmp_path):
    """``fedsyft submit`` checks --compress before it connects to any site."""
    import pandas as pd
    from typer.testing import CliRunner

    from datasites.cli.main import app

    rng = np.random.default_rng(0)
    pd.DataFrame({"f1": rng.normal(size=300), "f2": rng.normal(size=300),
                  "anomaly": (np.arange(300) % 10 == 0).astype(int)}).to_csv(
        tmp_path / "t.csv", index=False)
    runner = CliRunner(mix_stderr=False)
    assert runner.invoke(app, ["init", str(tmp_path / "fed"), "--data",
                               str(tmp_path / "t.csv")]).exit_code == 0
    config = str(tmp_path / "fed" / "federation.toml")
    for args, needle in ((["--compress", "zip"], "--compress: must be none, q8, q16 or topk:K"),
                         (["--compress", "topk:3", "--aggregation", "secagg"],
                          "--compress 'topk:3' sends a sparse update, which 'secagg' cannot "
                          "add")):
        result = runner.invoke(app, ["submit", "--config", config, *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_secure_error_feedback_carries_rounding_not_clipping():
    """Rounding is carried to the next round; a value clipped to the public bound is counted
    by the protection and dropped (carrying it would pile up round after round)."""
    spec = JobSpec(features=("a",), aggregation="secagg", compress="q8")
    codec = fit_codec(spec)
    private: dict[str, np.ndarray] = {}
    rows, step = 30.0, 1 / codec.scale  # this site: n = 10 of N = 30 rows, so w = 1/3
    w_vector = np.array([0.3 * step, 5.0, -7.0, 0.01, 1 / 3])  # [w·Δ, w·loss, w]
    sent, extra = compression.compress_fit(spec, w_vector * rows, rows, private)
    assert extra == {} and sent[-1] == pytest.approx(1 / 3)
    residual = private[compression.RESIDUAL]
    assert residual[0] == pytest.approx(0.3 * step)  # rounded to 0, carried
    assert residual[1] == residual[2] == 0.0  # beyond the bound: clipped, not carried
    again, _ = compression.compress_fit(spec, w_vector * rows, rows, private)
    assert again[0] == pytest.approx(0.6 * step)  # the carried rounding joins the next one
