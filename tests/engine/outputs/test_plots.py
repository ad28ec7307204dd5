"""Figures a newcomer reads (issue 12): titles below Plotly's hover toolbar, whole-step loss ticks, bar texts
never rotated, density colour bars with distinct percent ticks."""
import torch

from deftx_engine.outputs import plots


def test_titles_sit_below_the_toolbar_band():
    for fig in (plots.loss_figure([{"phase": "full", "step": 1, "loss": 2.0}]),
                plots.probabilities_figure(["a", "b"], [0.3, 0.7]),
                plots.confusion_figure({"labels": ["a"], "confusion": [[1]], "macro_f1": 1.0, "accuracy": 1.0})):
        title = fig.layout.title
        assert title.yref == "container" and title.pad.t >= plots.TOOLBAR_PX and fig.layout.margin.t >= 60
        assert title.xanchor == "left"


def test_a_one_point_loss_plot_ticks_whole_steps():
    fig = plots.loss_figure([{"phase": "full", "step": 5, "loss": 2.0}])
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"
    long = plots.loss_figure([{"phase": "full", "step": s, "loss": 1.0} for s in range(0, 500, 5)])
    assert long.layout.xaxis.dtick is None and long.layout.xaxis.tickformat == "d"


def test_bar_texts_are_never_rotated():
    assert plots.probabilities_figure(["a", "b"], [0.01, 0.99]).data[0].textangle == 0


def test_density_ticks_have_enough_digits():
    shapes = {"encoder.layer.0.attention.self.query.weight": (10, 100)}
    sparse = {"encoder.layer.0.attention.self.query.weight": torch.arange(5)}  # 0.5 %
    assert plots.density_heatmap(sparse, shapes).data[0].colorbar.tickformat == ".2%"
    dense = {"encoder.layer.0.attention.self.query.weight": torch.arange(500)}  # 50 %
    assert plots.density_heatmap(dense, shapes).data[0].colorbar.tickformat == ".0%"
