"""Plot helpers for the analysis results. matplotlib is optional and imported on first use.

Every helper draws into ``ax`` if given (else a new figure's axes) and returns the ``Axes``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["plot_cett_curve", "plot_essential_curve", "plot_history", "plot_per_layer"]


def _axes(ax):
  if ax is not None:
    return ax
  try:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("sparsejax.analysis plotting needs matplotlib: pip install 'sparsejax[notebooks]'.") from e
  _, ax = plt.subplots(figsize=(5, 3.5))
  return ax


def plot_essential_curve(curves: Mapping[str, Any], ax: Any = None, *, tolerance: float | None = None,
                         higher_is_better: bool = True, ylabel: str = "metric") -> Any:
  """Metric against sparsity for one or more :class:`EssentialCurve`, with their knees.

  Args:
    curves: ``{label: EssentialCurve}``.
    ax: matplotlib Axes (optional).
    tolerance: if given, marks each curve's knee (:func:`sparsejax.analysis.knee`).
    higher_is_better: passed to ``knee``.
    ylabel: y-axis label.

  Returns:
    The Axes.

  >>> import matplotlib; matplotlib.use('Agg')
  >>> from sparsejax.analysis.essential import EssentialCurve
  >>> c = EssentialCurve(np.array([0., .5, .9]), np.array([.9, .9, .3]), ())
  >>> plot_essential_curve({'global': c}, tolerance=0.01).get_xlabel()
  'sparsity'
  """
  from sparsejax.analysis.essential import knee  # pylint: disable=import-outside-toplevel
  ax = _axes(ax)
  for label, c in curves.items():
    (line,) = ax.plot(c.sparsity, c.metric, marker="o", ms=3, label=label)
    if tolerance is not None:
      k = knee(c, tolerance, higher_is_better=higher_is_better)
      if np.isfinite(k):
        ax.axvline(k, color=line.get_color(), ls=":", lw=1)
  ax.set_xlabel("sparsity")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  return ax


def plot_cett_curve(curves: Mapping[str, Any], ax: Any = None, *, ylabel: str = "perplexity") -> Any:
  """Metric against activation sparsity (``1 - activation ratio``) of :class:`CETTCurve` sweeps.

  >>> import matplotlib; matplotlib.use('Agg')
  >>> from sparsejax.analysis.cett import CETTCurve
  >>> c = CETTCurve(np.array([0., .1]), {}, np.array([.5, .2]), np.array([3., 3.1]))
  >>> plot_cett_curve({'relu': c}).get_xlabel()
  'activation sparsity (1 - activation ratio)'
  """
  ax = _axes(ax)
  for label, c in curves.items():
    ax.plot(1.0 - np.asarray(c.activation_ratio), c.metric, marker="o", ms=3, label=label)
  ax.set_xlabel("activation sparsity (1 - activation ratio)")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  return ax


def plot_per_layer(values: Mapping[str, Mapping[str, Any]], ax: Any = None, *, ylabel: str = "fraction") -> Any:
  """Grouped bars: one group per layer, one bar per series (e.g. per finetuning method).

  Args:
    values: ``{series: {layer_path: scalar}}`` (e.g. ``unchanged_fraction(...).per_leaf``).
    ax: matplotlib Axes (optional).
    ylabel: y-axis label.

  Returns:
    The Axes.

  >>> import matplotlib; matplotlib.use('Agg')
  >>> ax = plot_per_layer({'rl': {'fc1/kernel': 0.9}, 'sft': {'fc1/kernel': 0.2}})
  >>> [t.get_text() for t in ax.get_xticklabels()]
  ['fc1/kernel']
  """
  ax = _axes(ax)
  layers: list[str] = []
  for series in values.values():
    layers += [k for k in series if k not in layers]
  width = 0.8 / max(len(values), 1)
  x = np.arange(len(layers))
  for i, (label, series) in enumerate(values.items()):
    ys = [float(series.get(k, np.nan)) for k in layers]
    ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  return ax


def plot_history(history: Mapping[str, tuple[Sequence[float], Sequence[float]]], ax: Any = None, *,
                 xlabel: str = "step", ylabel: str = "nonzero fraction") -> Any:
  """Lines of a quantity over training (e.g. activation nonzero fraction, ITOP rate).

  Args:
    history: ``{label: (steps, values)}``.
    ax: matplotlib Axes (optional).
    xlabel: x-axis label.
    ylabel: y-axis label.

  Returns:
    The Axes.

  >>> import matplotlib; matplotlib.use('Agg')
  >>> plot_history({'width 256': ([0, 100], [0.5, 0.3])}).get_ylabel()
  'nonzero fraction'
  """
  ax = _axes(ax)
  for label, (steps, vals) in history.items():
    ax.plot(np.asarray(steps), np.asarray(vals, dtype=float), label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  return ax
