"""Profile plots (matplotlib, Agg backend): per-token latency distribution, TTFT vs prompt length."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (servers, containers)
    import matplotlib.pyplot as plt

    return plt


def plot_token_latency(latencies_ms: dict[str, list[float]], path: Path) -> Path | None:
    """Histogram and empirical CDF of per-token decode latency, one series per prompt length.

    Args:
        latencies_ms: prompt length (as text) -> every decode step's latency in ms (repeats pooled).
        path: the PNG to write.

    Returns:
        `path`, or None when there is no decode step to plot (one new token per run).
    """
    pooled = [v for values in latencies_ms.values() for v in values if v > 0]
    if not pooled:
        return None
    plt = _pyplot()
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(10, 3.8))
    # Decode latency is heavy-tailed (a few steps lose the CPU to the scheduler): on a linear
    # axis those would squeeze the bulk into one bar, so both panels use a log axis.
    lo, hi = min(pooled), max(pooled)
    hi = hi if hi > lo else lo * 1.01
    bins = [lo * (hi / lo) ** (i / 40) for i in range(41)]
    for length, values in latencies_ms.items():
        if not values:
            continue
        hist.hist(values, bins=bins, alpha=0.55, label=f"{length}-token prompt")
        ordered = sorted(values)
        n = len(ordered)
        cdf.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{length}-token prompt")
    hist.set(title="Per-token decode latency", xlabel="ms per token (log scale)", ylabel="tokens", xscale="log")
    cdf.set(title="Cumulative distribution", xlabel="ms per token (log scale)", ylabel="fraction of tokens",
            ylim=(0, 1.02), xscale="log")
    for q, style in ((0.5, ":"), (0.9, "--"), (0.99, "-.")):
        cdf.axhline(q, color="grey", linestyle=style, linewidth=0.8)
        cdf.text(cdf.get_xlim()[1], q, f" p{int(q * 100)}", va="center", fontsize=8, color="grey")
    hist.legend(fontsize=8)
    cdf.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft(ttft_by_prompt: dict[str, dict], path: Path, budget_ms: float | None = None) -> Path:
    """Median time to first token per prompt length, with min-max bars and the budget line.

    Args:
        ttft_by_prompt: prompt length (text) -> {p50, min, max} in ms.
        path: the PNG to write.
        budget_ms: the profile's max_ttft_ms, drawn as a line when given.
    """
    plt = _pyplot()
    lengths = sorted(ttft_by_prompt, key=int)
    x = [int(n) for n in lengths]
    p50 = [ttft_by_prompt[n]["p50"] for n in lengths]
    low = [p - ttft_by_prompt[n]["min"] for n, p in zip(lengths, p50)]
    high = [ttft_by_prompt[n]["max"] - p for n, p in zip(lengths, p50)]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(x, p50, yerr=[low, high], marker="o", capsize=4, label="median (bars: min to max)")
    top = max(ttft_by_prompt[n]["max"] for n in lengths)
    if budget_ms is not None and budget_ms <= 3 * top:
        ax.axhline(budget_ms, color="red", linestyle="--", linewidth=1, label=f"budget {budget_ms:g} ms")
    elif budget_ms is not None:  # far above the data: a line would flatten the curve to zero
        ax.set_title(f"budget {budget_ms:g} ms (off scale)", loc="right", fontsize=8, color="red")
    ax.set_title("Time to first token vs prompt length", loc="left")
    ax.set(xlabel="prompt tokens", ylabel="ms")
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
