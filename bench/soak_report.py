"""The soak's report: Markdown for a person (and bench/README.md), a PNG of the night beside it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak_checks import Sample

STATUSES = ("succeeded", "idle", "failed", "dead", "killed", "archived", "running", "queued", "abandoned", "created")


@dataclass
class Results:
    """Everything the soak measured, for the report and the plot."""

    kind: str
    started: float
    ended: float
    note: str
    faults: list[Any]
    skipped: list[str]
    outcomes: dict[str, Counter[str]]
    violations: list[str]
    figures: dict[str, float]
    alert_counts: Counter[str]
    samples: list[Sample] = field(default_factory=list)
    timeline: list[tuple[float, str, int]] = field(default_factory=list)  # the database's, by the workers' clocks
    spends: list[tuple[float, int]] = field(default_factory=list)  # the agents' own (t, micros), by the real clock


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def markdown(r: Results, plot: Path | None) -> str:
    """The whole report."""
    minutes = (r.ended - r.started) / 60
    lines = [f"## Soak on {r.kind}: {minutes:.1f} min, {len(r.faults)} faults, "
             f"{'PASS' if not r.violations else f'FAIL ({len(r.violations)} violations)'}", "", r.note, ""]
    used = [s for s in STATUSES if any(c[s] for c in r.outcomes.values())]
    rows = [[name, *[c[s] or "" for s in used], sum(c.values())] for name, c in sorted(r.outcomes.items())]
    total = Counter[str]()
    for c in r.outcomes.values():
        total.update(c)
    rows.append(["**all**", *[f"**{total[s]}**" for s in used], f"**{sum(total.values())}**"])
    lines += ["### Runs by outcome", "", *_table(["behaviour", *used, "runs"], rows), ""]
    rows = [[f.n, f"{f.start - r.started:.0f}", f.kind, f"{f.end - f.start:.1f}", f.detail,
             ", ".join(f"{k} {v}" for k, v in sorted(f.alerts.items())) or "-",
             "-" if f.recovered_s is None else f"{f.recovered_s:.1f}"] for f in r.faults]
    lines += ["### Faults injected", "",
              *_table(["#", "at s", "fault", "lasted s", "what", "alerts until the next fault",
                       "recovered s"], rows), ""]
    if r.skipped:
        lines += ["Not injected: " + "; ".join(r.skipped) + ".", ""]
    lines += ["### Alerts received (Sentry stand-in)", "",
              *_table(["alert", "events"], [[k, v] for k, v in sorted(r.alert_counts.items())] or [["-", 0]]), ""]
    f = r.figures
    if f:
        lines += ["### Worker processes, first vs last 10 % of samples (medians)", "",
                  *_table(["", "first 10 %", "last 10 %"],
                          [["processes", f"{f['procs_first']:.0f}", f"{f['procs_last']:.0f}"],
                           ["RSS MiB", f"{f['rss_first_mib']:.0f}", f"{f['rss_last_mib']:.0f}"],
                           ["open files", f"{f['fds_first']:.0f}", f"{f['fds_last']:.0f}"]]), ""]
    lines += ["### Violations", ""]
    lines += [f"- {v}" for v in r.violations[:50]] or ["None: every check passed."]
    if len(r.violations) > 50:
        lines.append(f"- ... and {len(r.violations) - 50} more")
    if plot is not None:
        lines += ["", f"Plot: `{plot.name}`"]
    return "\n".join(lines) + "\n"


def draw(r: Results, path: Path) -> Path | None:
    """Runs per 10 s by outcome, spend, faults and worker RSS over time; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (runs_ax, spend_ax, rss_ax) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    span = max(1.0, r.ended - r.started)
    buckets = int(span // 10) + 1
    for status in ("succeeded", "idle", "failed", "dead", "killed", "archived"):
        counts = [0] * buckets
        for t, s, _ in r.timeline:
            if s == status and 0 <= t - r.started < span:
                counts[int((t - r.started) // 10)] += 1
        if any(counts):
            runs_ax.plot([i * 10 for i in range(buckets)], counts, label=status)
    runs_ax.set_xlim(0, span)
    runs_ax.set_ylabel("runs finished / 10 s")
    runs_ax.legend(loc="upper right", fontsize="small", ncol=3)
    spent, xs, ys = 0, [], []
    for t, cost in sorted(r.spends):
        spent += cost
        xs.append(t - r.started)
        ys.append(spent / 1e6)
    spend_ax.plot(xs, ys)
    spend_ax.set_ylabel("agents' spend $ (cumulative)")
    rss_ax.plot([s.t - r.started for s in r.samples], [s.rss_kib / 1024 for s in r.samples], label="RSS MiB")
    rss_ax.plot([s.t - r.started for s in r.samples], [s.fds for s in r.samples], label="open files")
    rss_ax.set_ylabel("worker processes")
    rss_ax.set_xlabel("seconds since start")
    rss_ax.legend(loc="upper right", fontsize="small")
    for i, fault in enumerate(r.faults):
        for ax in (runs_ax, spend_ax, rss_ax):
            ax.axvspan(fault.start - r.started, max(fault.end - r.started, fault.start - r.started + 1),
                       color="red", alpha=0.15)
        low, high = runs_ax.get_ylim()
        runs_ax.annotate(fault.kind, (fault.start - r.started, high - (high - low) * (0.05 + 0.3 * (i % 3))),
                         rotation=90, fontsize="x-small", va="top", ha="right")
    fig.suptitle(f"Soak on {r.kind}: {len(r.faults)} faults, {len(r.violations)} violations")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
