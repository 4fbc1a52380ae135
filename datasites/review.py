"""A request in plain words, for the data owner who approves or denies it."""

from __future__ import annotations

from dataclasses import dataclass

from fed_tasks.spec import JobSpec

MODEL_NAMES = {"ae": "dense autoencoder"}
AGGREGATION_WORDS = {
    "plain": "plain: the data scientist's orchestrator sees this site's individual update",
    "paillier": "paillier: the update leaves encrypted under the key authority's key and "
                "signed by this site; only sums over at least the federation's minimum "
                "number of sites are ever decrypted",
    "secagg": "secagg: the update leaves masked; the masks cancel only in the sum over sites",
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

    def plain_words(self) -> str:
        """What approving this request lets the data scientist do, in a few lines."""
        head = f"Request {self.request_id} from {self.requester} at site {self.site} " \
               f"({self.status})"
        if self.spec is None or not self.template_ok:
            return (f"{head}\n  NOT the fedsyft job template: {self.problem}\n"
                    "  Approving it would run arbitrary code on the private table.")
        s = self.spec
        label = (f"label column {s.label_column!r} read only to compute ROC-AUC/PR-AUC on the "
                 f"test split, at most {s.evaluations} time(s)") if s.label_column else "no label"
        lines = [
            head,
            f"  job {s.job_id}: train a {MODEL_NAMES[s.model]} "
            f"(layers {list(s.hidden)}, latent {s.latent}) for at most {s.rounds} rounds of "
            f"{s.local_epochs} local epoch(s), learning rate {s.lr}, batch {s.batch_size}",
            f"  columns touched: {len(s.features)} features {list(s.features)}; {label}",
            "  leaves the site: one feature count/sum/sum-of-squares, then per round one "
            "weight update and its sample count, then the metrics",
            f"  aggregation {AGGREGATION_WORDS[s.aggregation]}",
            "  code: the fedsyft template (checked), calling the installed site step",
        ]
        return "\n".join(lines)
