"""``fedsyft``: the command line for the demo federation (and, later, owners and auditors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated anomaly detection across PySyft datasites.")
console = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated anomaly detection across PySyft datasites."""


def results_table(report: dict[str, Any]) -> Table:
    """Federated vs centralized vs local-only, per site and pooled (ROC-AUC / PR-AUC)."""
    table = Table(title=f"ROC-AUC / PR-AUC on the sites' private test splits\n"
                        f"{report['sites']} sites, {report['rounds']} rounds, "
                        f"{report['aggregation']} aggregation")
    sites = [row["site"] for row in report["per_site"]]
    table.add_column("model")
    for name in sites:
        table.add_column(name, justify="right")
    table.add_column("pooled", justify="right", style="bold")
    rows = (("federated", report["per_site"], report["federated"]),
            ("centralized", report["centralized"]["per_site"], report["centralized"]),
            ("local-only", report["local_only"]["per_site"], report["local_only"]))
    for label, per_site, pooled in rows:
        cells = [f"{r['roc_auc']:.3f} / {r['pr_auc']:.3f}" for r in per_site]
        table.add_row(label, *cells, f"{pooled['roc_auc']:.3f} / {pooled['pr_auc']:.3f}")
    table.caption = ("pooled = union of all test splits; local-only = mean over sites of a "
                     "model trained on one site alone")
    return table


@app.command()
def demo(
    data: Path = typer.Option(None, help="CSV with numeric features and a 0/1 label column "
                                         "[default: bundled ODDS shuttle table]"),
    label_column: str = typer.Option("anomaly", help="Name of the 0/1 label column."),
    sites: int = typer.Option(3, min=1, max=20, help="Number of institutions."),
    rounds: int = typer.Option(10, min=1, max=1000, help="Federated rounds."),
    model: str = typer.Option("ae", help="Model kind: ae (dense autoencoder)."),
    aggregation: str = typer.Option("plain", help="How updates are combined: plain | "
                                    "paillier (key authority decrypts sums only) | secagg."),
    seed: int = typer.Option(0, help="Seed for the split and the model."),
    report: Path = typer.Option(None, help="Write the JSON report here."),
) -> None:
    """Split a table across non-IID sites, provision datasites, train, evaluate, report."""
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    from datasites.demo import BUNDLED_TABLE, DemoConfig, run_demo
    from datasites.errors import AuthenticationError, ProvisioningError
    from datasites.tables import TableError
    from fed_tasks.interface import SiteRefusedError

    cfg = DemoConfig(data=data or BUNDLED_TABLE, label_column=label_column, sites=sites,
                     rounds=rounds, model=model, seed=seed, aggregation=aggregation)
    try:
        result = run_demo(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except (TableError, ProvisioningError, AuthenticationError, SiteRefusedError,
            ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(results_table(result))
    console.print(f"finished in {result['seconds']:.1f} s "
                  f"(provisioning {result['timing']['provision_s']:.1f} s, federated training "
                  f"{result['timing']['train_s']:.1f} s)")
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2))
        console.print(f"report written to {report}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
