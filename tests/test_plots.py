import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from finer1_lib.plots import label_bars, legend_outside, method_name, moving_average  # noqa: E402


def test_label_bars_labels_zero_bars():
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [0.0, 12.5])
    label_bars(ax)
    assert [t.get_text() for t in ax.texts] == ["0.0", "12.5"]
    plt.close(fig)


def test_legend_outside_is_right_of_axes():
    fig, ax = plt.subplots()
    ax.plot([0, 1], label="x")
    leg = legend_outside(ax)
    assert leg.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
    plt.close(fig)


def test_moving_average_and_method_name():
    assert list(moving_average([0, 3, 0], 3)) == [1.5, 1.0, 1.5]
    assert list(moving_average([1, 2], 1)) == [1.0, 2.0]
    assert method_name("tapo-dapo") == "CoT SFT + DAPO" and method_name("CoT SFT") == "CoT SFT"


def test_label_bars_cap_cuts_the_tall_bar():
    fig, ax = plt.subplots()
    ax.barh(["a", "b"], [5.0, 90.0])
    label_bars(ax, cap=20)
    assert ax.get_xlim() == (0, 20)
    assert sorted(t.get_text() for t in ax.texts) == ["", "5.0", "90.0 (axis cut)"]
    plt.close(fig)
