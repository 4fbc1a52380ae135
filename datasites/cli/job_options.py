"""The demo's job options: the ranges the CLI gives typer, and a JobSpec error as a flag.

The ranges are what a job must satisfy to run on a new demo site: :class:`JobSpec`'s own
bounds, narrowed by the default :class:`DatasetPolicy` (rounds, epsilon budget, delta,
sites per aggregate) and by what the sites feed numpy and torch (the seed). The CLI refuses
anything outside them at once, instead of the sites refusing it after the table was read
(``tests/test_bad_inputs.py`` checks that they match those sources). This module imports
pydantic only (the detector registry is a dict of names): the CLI reads these numbers at
start-up.
"""

from __future__ import annotations

import re
from typing import Any

from fed_tasks.detectors import REGISTRY
from fed_tasks.spec import NO_DP_MODELS, PLAIN_ONLY_MODELS, ROW_DP_MODELS, SERIES_MODELS
from fed_tasks.strategies import REGISTRY as STRATEGY_REGISTRY

SITES_MIN, SITES_MAX = 2, 20  # DatasetPolicy.min_sites: an aggregate combines >= 2 sites
ROUNDS_MIN, ROUNDS_MAX = 1, 100  # DatasetPolicy.max_rounds (JobSpec alone allows 1000)
# the demo's rounds when none are asked for; DP-SGD's noise grows with its epochs, and 3
# rounds of 2 epochs kept pooled ROC-AUC >= 0.99 on shuttle at epsilon 1 and 3 in every run
# (benchmarks/dp_demo.py), where 10 rounds dipped to 0.987. lstm-ae keeps 10 too: on the ten
# NAB devices `demo --model lstm-ae` with every default beats the devices alone on seeds 0-2
# (README "Detectors on real tables"); the benchmark's 12 rounds are its own setting
DEFAULT_ROUNDS, DP_SGD_ROUNDS = 10, 3
EPSILON_MAX = 10.0  # DatasetPolicy.epsilon_budget of a new dataset
DELTA_MAX = 1e-5  # DatasetPolicy.max_delta
# the sites seed numpy (non-negative) and torch with seed * 100_003 + rounds (< 2**64)
SEED_MAX = (2**64 - 1 - ROUNDS_MAX) // 100_003
# every detector a job may name (and a new site's policy allows); the series models
# (SERIES_MODELS) need --time-column, which the others refuse
MODELS = (*REGISTRY, "auto")  # auto: the best of several (fed_tasks/selection.py)
STRATEGIES = tuple(STRATEGY_REGISTRY)
PERSONALIZE_MAX = 100  # JobSpec.personalize_epochs
DP_MODELS = tuple(m for m in MODELS if m not in NO_DP_MODELS)  # those that take --epsilon
PLAIN_ONLY = tuple(m for m in MODELS if m in PLAIN_ONLY_MODELS)  # --aggregation plain only
DP_UNITS = ("row", "site")
ADAPTIVE_CLIP_HELP = (
    "With --dp-unit site: adaptive clipping (Andrew et al. 2021): each round the clip moves "
    "towards the median update norm, learnt from a noisy count every party derives from the "
    "released sums; --clip is where it starts.")
DP_UNIT_HELP = (
    "What --epsilon protects: 'row' (sample-level DP-SGD: each row of each site's table) or "
    "'site' (client-level DP-FedAvg: all of one site's data) [default: site, unless its noise "
    "would swamp the signal of a federation this small; then row, which is said]. pca and "
    "hbos: always row.")
TARGET_FPR_MIN, TARGET_FPR_MAX = 0.0, 0.5  # JobSpec.target_fpr, both bounds excluded
PATIENCE_MAX = ROUNDS_MAX  # patience beyond the rounds never stops anything
COMPRESS_HELP = (
    "Smaller training updates: none; q16 / q8 (16 / 8 bits per value: plain mode quantizes "
    "each update between its own min and max, paillier/secagg use 16- / 8-bit fixed point); "
    "topk:K (only the K largest changes leave; plain only). What a compression drops stays "
    "at the site and joins its next update. The report gives the bytes each site sent per "
    "round.")

# JobSpec field -> the demo option it comes from
FLAGS = {"rounds": "--rounds", "seed": "--seed", "aggregation": "--aggregation",
         "model": "--model", "min_sites": "--sites", "dp_epsilon": "--epsilon",
         "dp_delta": "--delta", "dp_clip": "--clip", "dp_sgd": "--dp-unit",
         "dp_adaptive_clip": "--adaptive-clip",
         "label_column": "--label-column", "features": "--data",
         "target_fpr": "--target-fpr", "patience": "--patience",
         "time_column": "--time-column", "strategy": "--strategy",
         "personalize_epochs": "--personalize", "fraction": "--fraction",
         "round_timeout": "--round-timeout", "async_k": "--async",
         "compress": "--compress"}
ALLOWED = {"--sites": f"{SITES_MIN} to {SITES_MAX}",
           "--rounds": f"{ROUNDS_MIN} to {ROUNDS_MAX}",
           "--seed": f"0 to {SEED_MAX}",
           "--aggregation": "plain, paillier, secagg",
           "--model": ", ".join(MODELS),
           "--epsilon": f"a finite number above 0, at most {EPSILON_MAX:g}",
           "--delta": f"above 0, at most {DELTA_MAX:g}",
           "--clip": "a finite number above 0",
           "--target-fpr": f"above {TARGET_FPR_MIN:g}, below {TARGET_FPR_MAX:g}",
           "--patience": f"0 to {PATIENCE_MAX}",
           "--strategy": ", ".join(STRATEGIES),
           "--personalize": f"0 to {PERSONALIZE_MAX}",
           "--fraction": "above 0, at most 1",
           "--round-timeout": "above 0, at most 86400 seconds",
           "--async": "1 to the number of sites"}


def dp_unit_of(epsilon: float | None, dp_unit: str | None, *, dp_sgd: bool = False,
               adaptive_clip: bool = False, clip: float = 1.0, delta: float = 1e-5
               ) -> str | None:
    """``--dp-unit`` (the older ``--dp-sgd`` means ``--dp-unit row``), once the DP flags
    are known to come with ``--epsilon``."""
    if dp_sgd and dp_unit == "site":
        raise JobOptionError("--dp-sgd is --dp-unit row: it contradicts --dp-unit site")
    dp_unit = "row" if dp_sgd else dp_unit
    if (dp_unit or adaptive_clip or clip != 1.0 or delta != 1e-5) and epsilon is None:
        raise JobOptionError("--delta, --clip, --dp-unit and --adaptive-clip need --epsilon")
    return dp_unit


def strategy_options(strategy: str, sites: int) -> dict[str, Any]:
    """The strategy's spec fields for a demo of ``sites`` institutions: Krum tolerates
    ⌊(n − 3)/2⌋ malicious sites and needs every site in each round."""
    if strategy != "krum":
        return {"strategy": strategy, "min_sites": min(2, sites)}
    return {"strategy": strategy, "min_sites": sites, "krum_byzantine": max(0, (sites - 3) // 2)}


class JobOptionError(ValueError):
    """A demo option the job cannot take; the message names the flag and what is allowed."""


def spec_error_line(exc: Any) -> str:
    """A pydantic ``ValidationError`` of :class:`JobSpec` as one line in the CLI's words:
    ``--flag: problem (got value; allowed: range)``, never a multi-line dump naming fields
    the user never typed."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        if not field:  # a whole-spec rule: speak of the flags its message names
            for name, flag in FLAGS.items():
                message = re.sub(rf"\b{name}\b", flag, message)
            parts.append(message)
            continue
        flag = FLAGS.get(field, field)
        detail = [f"got {error['input']!r}"] if "input" in error else []
        detail += [f"allowed: {ALLOWED[flag]}"] if flag in ALLOWED else []
        tail = f" ({'; '.join(detail)})" if detail else ""
        parts.append(f"{flag}: {message[:1].lower()}{message[1:]}{tail}")
    return "; ".join(parts) or "the job's options are invalid"


def check_job_options(*, sites: int, rounds: int, model: str, aggregation: str, seed: int,
                      epsilon: float | None, delta: float, clip: float,
                      dp_unit: str | None, adaptive_clip: bool = False,
                      target_fpr: float | None = None, patience: int = 0,
                      time_column: str | None = None, strategy: str = "fedavg",
                      personalize: int = 0, fraction: float = 1.0,
                      round_timeout: float | None = None,
                      async_k: int | None = None, compress: str = "none") -> None:
    """Build the :class:`JobSpec` the demo would build (with a stand-in feature), so that a
    bad option fails in milliseconds, before the table is read or a site exists."""
    from pydantic import ValidationError

    from fed_tasks.spec import JobSpec

    if time_column is not None and not time_column.strip():
        raise JobOptionError("--time-column: give the name of the table's time column")
    if model in SERIES_MODELS and time_column is None:
        raise JobOptionError(f"--model {model} reads each site's series in time order: name "
                             "the table's time column with --time-column")
    if model not in SERIES_MODELS and time_column is not None:
        raise JobOptionError(f"--time-column orders the rows of a series model "
                             f"({', '.join(SERIES_MODELS)}); --model {model} scores rows "
                             "independently: leave --time-column out")
    if dp_unit == "site" and model in ROW_DP_MODELS:
        raise JobOptionError(f"--dp-unit site: --model {model} releases sums noised per row; "
                             "its unit is always one row (leave --dp-unit out)")
    dp: dict[str, Any] = {}
    row = dp_unit == "row" and model not in ROW_DP_MODELS
    if epsilon is not None:  # as datasites.harness.demo.run_demo sets them
        dp = {"dp_epsilon": epsilon, "dp_delta": delta, "dp_clip": clip, "dp_sgd": row,
              "dp_adaptive_clip": adaptive_clip, **({"trim": 0.0} if row else {})}
    if adaptive_clip and dp_unit != "site":
        raise JobOptionError("--adaptive-clip adapts the clip of a site's whole update: it "
                             "needs --epsilon with --dp-unit site")
    if async_k is not None and not 1 <= async_k <= sites:
        raise JobOptionError(f"--async {async_k}: a round's buffer takes 1 to --sites "
                             f"({sites}) updates")
    try:
        JobSpec(model=model, features=("x" if time_column != "x" else "y",),
                time_column=time_column, rounds=rounds, seed=seed, aggregation=aggregation,
                target_fpr=target_fpr, patience=patience, personalize_epochs=personalize,
                fraction=fraction, round_timeout=round_timeout, async_k=async_k,
                compress=compress,
                **strategy_options(strategy, sites), **dp)
    except ValidationError as exc:
        raise JobOptionError(spec_error_line(exc)) from None
