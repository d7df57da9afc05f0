"""The procedural data set: classes, determinism per (seed, index), workers, detail by class."""

from __future__ import annotations

import numpy as np
import pytest

from toprovar_fx.data import procedural as P


def test_classes():
    names = P.class_names()
    assert len(names) == P.NUM_CLASSES == 16
    assert len(set(names)) == len(names)
    assert set(P.SIMPLE_CLASSES) <= set(names) and set(P.DENSE_CLASSES) <= set(names)
    assert [P.label_of(i) for i in range(20)] == [i % 16 for i in range(20)]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_determinism(size):
    for index in range(P.NUM_CLASSES):
        a, la = P.make_sample(3, index, size)
        b, lb = P.make_sample(3, index, size)
        assert a.shape == (size, size, 3) and a.dtype == np.uint8
        assert la == lb == index % P.NUM_CLASSES
        np.testing.assert_array_equal(a, b)


def test_seed_and_index_change_the_image():
    a, _ = P.make_sample(0, 5, 64)
    assert not np.array_equal(a, P.make_sample(1, 5, 64)[0])
    assert not np.array_equal(a, P.make_sample(0, 5 + P.NUM_CLASSES, 64)[0])


def test_full_size_image():
    img, label = P.make_sample(0, 14, 256)
    assert img.shape == (256, 256, 3) and label == 14


def test_batch_independent_of_workers_and_chunks():
    a, la = P.make_batch(7, 10, 40, 32)
    b, lb = P.make_batch(7, 10, 40, 32, workers=2, chunk=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a[3], P.make_sample(7, 13, 32)[0])
    firsts = [first for first, _ in P.iter_chunks(7, 10, 40, 32, chunk=16)]
    assert firsts == [10, 26, 42]


def test_every_class_has_content():
    for c in range(P.NUM_CLASSES):
        img = P.render(c, P.sample_rng(0, c), 64)
        assert img.std() > 1.0, P.class_names()[c]


def test_dense_classes_have_more_detail_than_simple_ones():
    def detail(c: int) -> list[float]:
        out = []
        for i in range(4):
            im = P.render(c, P.sample_rng(1, c + 16 * i), 128).astype(np.float32)
            out.append(float(np.abs(np.diff(im, axis=0)).mean() + np.abs(np.diff(im, axis=1)).mean()))
        return out

    names = P.class_names()
    simple = max(max(detail(names.index(n))) for n in P.SIMPLE_CLASSES)
    dense = min(min(detail(names.index(n))) for n in P.DENSE_CLASSES)
    assert dense > 1.2 * simple, (dense, simple)


def test_bad_label():
    with pytest.raises(ValueError):
        P.render(P.NUM_CLASSES, P.sample_rng(0, 0), 32)


def test_grid():
    imgs = np.zeros((5, 8, 8, 3), np.uint8)
    g = P.grid(imgs, cols=2, pad=1)
    assert g.shape == (3 * 9 + 1, 2 * 9 + 1, 3)


def test_fonts_found():
    pytest.importorskip("matplotlib")
    assert len(P.font_paths()) >= 4
