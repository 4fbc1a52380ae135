"""A request in plain words, for the data owner who approves or denies it."""

from __future__ import annotations

from dataclasses import dataclass

from fed_tasks import calibration, dp_sums
from fed_tasks.detectors import rules_for
from fed_tasks.spec import JobSpec

#: the neural detectors, trained in rounds (the others are built from sums alone)
MODEL_NAMES = {"ae": "dense autoencoder", "vae": "variational autoencoder",
               "deepsvdd": "Deep SVDD one-class network",
               "lstm-ae": "LSTM autoencoder over windows of the series"}
AGGREGATION_WORDS = {
    "plain": "plain: the data scientist's orchestrator sees this site's individual update, "
             "and every member site sees it too (each site checks the aggregate it trains "
             "from by adding the signed updates itself)",
    "paillier": "paillier: the update leaves encrypted under the key authority's key and "
                "signed by this site; only sums over at least the federation's minimum "
                "number of sites are ever decrypted",
    "secagg": "secagg: the update leaves masked; the orchestrator can only add masked "
              "updates, and this site opens (and releases) only sums over at least the job's "
              "minimum number of sites and the secure sum's threshold",
}


@dataclass(frozen=True)
class Review:
    request_id: str
    site: str
    requester: str
    status: str
    code: str
    spec: JobSpec | None
    template_ok: bool
    problem: str = ""
    violations: tuple[str, ...] = ()  # of the dataset's policy, checked again at approval
    budget: str = ""  # the dataset's privacy budget, in words
    requester_id: str = ""  # the syft verify key that signed the request: what policies bind
    train_rows: int | None = None  # this site's private training rows (the owner's own fact)
    warnings: tuple[str, ...] = ()  # what the policy lets run but the owner should know

    @property
    def requester_words(self) -> str:
        return f"{self.requester} (syft user {self.requester_id[:12]}…)" if self.requester_id \
            else self.requester

    def plain_words(self) -> str:
        """What approving this request lets the data scientist do, in a few lines."""
        head = f"Request {self.request_id} from {self.requester_words} at site {self.site} " \
               f"({self.status})"
        if self.spec is None or not self.template_ok:
            lines = [head, f"  NOT the fedsyft job template: {self.problem}",
                     "  Approving it would run arbitrary code on the private table: the site "
                     "can neither limit nor account what it does. Only an explicit override "
                     "approves it: approve(request_id, override_reason=...), recorded in the "
                     "audit log."]
            return "\n".join(lines + self._policy_lines())
        s = self.spec
        label = (f"label column {s.label_column!r} read only to compute ROC-AUC/PR-AUC on the "
                 f"test split, at most {s.evaluations} time(s)") if s.label_column else "no label"
        if s.model == "auto":
            return "\n".join([head, *_selection(s, self.train_rows, label)]
                             + self._policy_lines())
        lines = [
            head,
            _what(s),
            f"  columns touched: {len(s.features)} features {list(s.features)}; {label}",
            _shape(s, self.train_rows),
            _leaves(s),
            *_compression(s),
            _privacy(s),
            *_noise(s, self.train_rows),
            f"  aggregation {AGGREGATION_WORDS[s.aggregation]}",
            *_buffered(s),
            "  code: the fedsyft template (checked), calling the installed site step",
        ]
        return "\n".join(lines + self._policy_lines())

    def _policy_lines(self) -> list[str]:
        out = [f"  privacy budget: {self.budget}"] if self.budget else []
        out += [f"  WARNING: {w}" for w in self.warnings]
        if self.violations:
            out.append("  POLICY VIOLATIONS (the site refuses to approve this job):")
            out += [f"    - {v}" for v in self.violations]
        elif self.spec is not None:
            out.append("  policy: the job complies with this dataset's policy")
        return out


def _noise(s: JobSpec, rows: int | None) -> list[str]:
    """A DP job: how large the noise on each release is against its signal, in words."""
    from fed_tasks import dp_usefulness

    est = dp_usefulness.estimate(s, rows)
    if est is None:
        return []
    verdict = ("the noise is larger than anything the data can say in a release: expect a "
               "useless model" if est.ratio > dp_usefulness.USEFUL_RATIO
               else "the data's signal dominates the noise")
    return [f"  noise vs signal: {est.words()}: {verdict}"]


def _buffered(s: JobSpec) -> list[str]:
    """Buffered rounds: the updates of several models in one aggregate, in plain words."""
    if s.async_k is None:
        return []
    return [f"  rounds are buffered: each aggregate is formed once {s.async_k} site(s) have "
            f"answered (at least {s.min_sites} with an update of that very round); a slower "
            "site's update joins a later round, weighted down by how many rounds old it is "
            f"(at most {s.max_staleness}); your site accepts only updates computed from a "
            "model it held itself, each once"] + (
        ["  in the secure sum a site too slow for its round has that round's mask key "
         "revealed and masks its update again later: the late copy is then hidden only by a "
         "mask every member can remove (README, Security model)"]
        if s.aggregation == "secagg" else [])


def _selection(s: JobSpec, rows: int | None, label: str) -> list[str]:
    """A model-selection job: what each candidate does, and how the winner is chosen."""
    names = s.candidate_models
    lines = [f"  job {s.job_id}: trains {len(names)} models ({', '.join(names)}) one after "
             f"the other, scores each on a private validation split of {s.val_fraction:.0%} of "
             f"your training rows ({len(names)} evaluations; only the metrics leave) and keeps "
             f"the best; the others are discarded",
             f"  columns touched: {len(s.features)} features {list(s.features)}; {label}; "
             "the label is also read for the validation metrics",
             f"  aggregation {AGGREGATION_WORDS[s.aggregation]}"]
    for i, sub in enumerate(s.candidate_specs):
        lines += [f"  candidate {i + 1}, {sub.model}:", "  " + _what(sub), "  " + _shape(sub, rows),
                  "  " + _leaves(sub)]
    return lines + [*_compression(s), _privacy(s),
                    "  code: the fedsyft template (checked), calling the installed site step"]


def _what(s: JobSpec) -> str:
    if s.model in MODEL_NAMES:
        stop = (f", stopping early once the loss stops improving for {s.patience} rounds"
                if s.patience and not s.dp_enabled else "")
        return (f"  job {s.job_id}: train a {MODEL_NAMES[s.model]} "
                f"(layers {list(s.hidden)}, latent {s.latent}) for at most {s.rounds} rounds "
                f"of {s.local_epochs} local epoch(s) (at least {s.min_local_steps} steps), "
                f"learning rate {s.lr}, batch {s.batch_size}{stop}")
    return f"  job {s.job_id}: build {rules_for(s).title} (no training rounds)"


def _shape(s: JobSpec, rows: int | None) -> str:
    """What bounds how much one update can carry: a first layer as wide as the table, small
    batches and no trimming are the shape of a model built to memorize rows."""
    from datasites.governance.policy import model_parameters

    if s.model not in MODEL_NAMES:
        return (f"  model shape: {model_parameters(s):,} summed values, fixed by the "
                f"{len(s.features)} features (no layer the data scientist chooses)")

    width = s.hidden[0] if s.hidden else s.latent
    against = f" for {rows:,} private training rows" if rows else ""
    warn = ""
    if rows and width >= rows / 10:
        warn = " (WIDE: close to the row count, enough units to hold rows one by one)"
    return (f"  model shape: {model_parameters(s):,} parameters; first layer {width} units"
            f"{against}{warn}; batch {s.batch_size}, trim {s.trim:g} (each update is the "
            "federation's model trained on this site's rows; the site never trains on a model "
            "the data scientist sends)")


def _leaves(s: JobSpec) -> str:
    threshold = (f", then twice the counts of your training rows' scores in "
                 f"{calibration.bins(s) + 2:,} fixed bins (the alarm threshold at "
                 f"{s.target_fpr:.1%} false positives; no single score leaves)"
                 if calibration.enabled(s) else "")
    if dp_sums.applies(s):
        return ("  leaves the site: feature counts/sums of the published mock (nothing "
                f"private), then {rules_for(s).leaves}{threshold}, each with Gaussian noise "
                "added here (see differential privacy), then the metrics (not noised)")
    if s.model not in MODEL_NAMES or s.model == "deepsvdd":
        return (f"  leaves the site: one feature count/sum/sum-of-squares, then "
                f"{rules_for(s).leaves}{threshold}, then the metrics")
    if not s.dp_enabled:
        return ("  leaves the site: one feature count/sum/sum-of-squares, then per round one "
                f"weight update and its sample count{threshold}, then the metrics")
    return ("  leaves the site: feature counts/sums of the published mock (nothing private), "
            "then per round one privatized weight update (no sample count, loss withheld), "
            "then the metrics")


def _compression(s: JobSpec) -> list[str]:
    """A compressed job: what form each round's update leaves in, in words."""
    if s.compress == "none":
        return []
    from fed_tasks.compression import words

    return [f"  compression of each round's update: {words(s.compress, s.aggregation)}"]


def _privacy(s: JobSpec) -> str:
    if not s.dp_enabled:
        return ("  differential privacy: none; the updates and the released model carry no "
                "formal guarantee")
    if dp_sums.applies(s):
        return _row_privacy(s)
    if s.dp_sgd:
        return (f"  differential privacy: sample-level DP-SGD, epsilon {s.dp_epsilon:g} at delta "
                f"{s.dp_delta:g} per row over the whole job; each row's gradient is clipped to "
                f"norm {s.dp_clip:g} and noised, calibrated here to this site's row count")
    from fed_tasks.dp_step import adaptive_clip, client_plan, noise_shares

    z, n = client_plan(s).noise_multiplier, noise_shares(s)
    share = "the full noise" if n == 1 else f"1/{n} of the noise variance (the sum gets all)"
    text = (f"  differential privacy: client-level DP-FedAvg, epsilon {s.dp_epsilon:g} at delta "
            f"{s.dp_delta:g} for this whole site over {s.rounds} rounds; each round the update "
            f"is clipped to L2 norm {s.dp_clip:g} and this site adds {share}, noise multiplier "
            f"{z:.3g}; charged to the ledger round by round")
    rule = adaptive_clip(s)
    if rule is None:
        return text
    return (text.replace(f"clipped to L2 norm {s.dp_clip:g}", "clipped to an adaptive L2 norm")
            + f"\n  adaptive clipping: the clip starts at {rule.initial:g} and moves each round "
            f"towards the norm that {s.dp_clip_quantile:.0%} of the sites' updates stay under "
            f"(learning rate {rule.lr:g}); each round this site also sends whether its update "
            f"was under the clip, one bit hidden by noise (std {rule.count_std:.3g} on the "
            f"summed count, this site adding its share), which is why the update's noise "
            f"multiplier is {rule.update_noise_multiplier:.3g} instead of {z:.3g}; the epsilon "
            "and its charges are the same. The clip follows from the released noisy counts "
            "only, as this site derives them itself, never from the data scientist's messages")


def _row_privacy(s: JobSpec) -> str:
    """A pca/hbos job under DP: which sums are noised, with how much, and who adds it."""
    from fed_tasks.dp_step import noise_shares

    d, action = len(s.features), dp_sums.DETECTOR_ACTION[s.model]
    size = (f"sensitivity {dp_sums.sensitivity(s, action):.3g}), noise std "
            f"{dp_sums.noise_std(s, action):.3g}")
    parts = [f"the per-feature histograms (one row moves {d} counts by 1: {size} on each "
             "released count"
             if action == "hist" else
             f"the second-moment sums (each standardized row first clipped to L2 norm "
             f"{s.dp_row_clip:g}: {size} on each released value"]
    if calibration.enabled(s):
        parts.append(f"the {calibration.PASSES} threshold passes (one row moves one count), "
                     f"noise std {dp_sums.noise_std(s, 'calibrate'):.3g} on each released count")
    n = noise_shares(s)
    share = ("this site adds all of it" if n == 1 else
             f"this site adds 1/{n} of the noise variance (the secure sum gets all of it)")
    return (f"  differential privacy: per row, epsilon {s.dp_epsilon:g} at delta "
            f"{s.dp_delta:g} for each row of your table over the whole job: Gaussian noise on "
            f"each of its {dp_sums.releases(s)} summed release(s), noise multiplier "
            f"{dp_sums.noise_multiplier(s):.3g}: " + "; ".join(parts) + f"; {share}; each "
            "release is charged to the ledger before it is computed")
