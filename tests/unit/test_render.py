"""dicom.render: rendering parameters, the VOI functions (pydicom's apply_windowing as the
oracle), grayscale and colour display values, the viewport, and the encoded image (Pillow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_windowing

from openpacs.dicom import render
from openpacs.dicom.render import RenderError, Viewport, Window


def test_window_parse() -> None:
    assert Window.parse("40,400") == Window(40, 400, "LINEAR")
    assert Window.parse(" -10.5 , 80 , LINEAR-EXACT") == Window(-10.5, 80, "LINEAR_EXACT")
    assert Window.parse("1,2,sigmoid").function == "SIGMOID"
    for bad in ("", "1", "1,2,3,4", "a,2", "1,0", "1,0.5,linear", "1,nan", "1,2,cubic", "1,-3"):
        with pytest.raises(RenderError):
            Window.parse(bad)


def test_viewport_and_quality_parse() -> None:
    assert Viewport.parse("64,32") == Viewport(64, 32, None)
    assert Viewport.parse(",32") == Viewport(None, 32, None)
    assert Viewport.parse("8,8,1,2,-4,") == Viewport(8, 8, (1, 2, -4, None))
    for bad in ("0,1", "1", "a,b", "1,2,3", "9000,1", "8,8,-1,0,4,4", "8,8,0,0,0,4"):
        with pytest.raises(RenderError):
            Viewport.parse(bad)
    assert render.parse_quality("1") == 1 and render.parse_quality("100") == 100
    for bad in ("0", "101", "x", "9.5"):
        with pytest.raises(RenderError):
            render.parse_quality(bad)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(128, 64), (100.5, 1), (30, 7), (200, 300)])
def test_apply_window_matches_pydicom(function: str, center: float, width: float) -> None:
    if function == "LINEAR" and width < 2:
        width = 2
    values = np.arange(256, dtype=np.uint8)
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation = 8, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    oracle = np.rint(apply_windowing(values.astype(np.float64), ds))
    ours = render.apply_window(values, Window(center, width, function))
    assert ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - oracle.astype(int)).max() <= 1


def _ds(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_grayscale_modality_voi_and_monochrome1() -> None:
    arr = np.array([[0, 10], [20, 30]], dtype=np.uint16)
    # Rescale: values become -1000..-940; a window around them spreads them over 0..255
    ds = _ds(RescaleSlope=2, RescaleIntercept=-1000)
    out = render.grayscale(arr, ds, "MONOCHROME2", Window(-970, 59, "LINEAR"))
    assert out[0, 0] == 0 and out[1, 1] == 255 and 0 < out[0, 1] < out[1, 0] < 255
    inverted = render.grayscale(arr, ds, "MONOCHROME1", Window(-970, 59, "LINEAR"))
    assert np.array_equal(inverted, 255 - out)
    # the data set's window when the request has none; a bad stored window is skipped
    stored = render.grayscale(arr, _ds(WindowCenter=15, WindowWidth=2), "MONOCHROME2", None)
    assert stored.tolist() == [[0, 0], [255, 255]]
    auto = render.grayscale(arr, _ds(WindowCenter=5, WindowWidth=0), "MONOCHROME2", None)
    assert auto[0, 0] == 0 and auto[1, 1] == 255  # min..max
    flat = render.grayscale(np.full((2, 2), 7, np.uint16), Dataset(), "MONOCHROME2", None)
    assert not flat.any()


def test_frame_attributes_from_functional_groups() -> None:
    def group(center: float) -> Dataset:
        voi = _ds(WindowCenter=center, WindowWidth=10)
        return _ds(FrameVOILUTSequence=[voi])

    ds = _ds(
        SharedFunctionalGroupsSequence=[
            _ds(PixelValueTransformationSequence=[_ds(RescaleSlope=1, RescaleIntercept=5)])
        ],
        PerFrameFunctionalGroupsSequence=[group(1), group(2), group(3)],
    )
    one = render.frame_attributes(ds, 1)
    assert one.WindowCenter == 2 and one.RescaleIntercept == 5
    assert render.default_window(one) == Window(2, 10)


def test_colour() -> None:
    rgb16 = np.full((2, 2, 3), 0x0FFF, np.uint16)
    assert render.color(rgb16, Dataset(), "RGB", 12).max() == 255
    rgb8 = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(render.color(rgb8, Dataset(), "RGB", 8), rgb8)
    with pytest.raises(RenderError):
        render.to_display(np.zeros((2, 2, 3), np.uint8), Dataset(), "MONOCHROME2", 8, None)


def test_viewport_region_flip_and_fit() -> None:
    img = Image.fromarray(np.arange(16 * 8, dtype=np.uint8).reshape(8, 16), "L")
    assert render.apply_viewport(img, Viewport(8, 8)).size == (8, 4)  # aspect kept
    assert render.apply_viewport(img, Viewport(None, 16)).size == (32, 16)
    assert render.apply_viewport(img, None, fit=4).size == (4, 2)
    assert render.apply_viewport(img, None) is img
    cut = render.apply_viewport(img, Viewport(None, None, (2, 1, 3, 2)))
    assert np.array_equal(np.asarray(cut), np.asarray(img)[1:3, 2:5])
    flipped = render.apply_viewport(img, Viewport(None, None, (5, 1, -3, 2)))
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[1:3, 2:5][:, ::-1])
    with pytest.raises(RenderError):
        render.apply_viewport(img, Viewport(None, None, (40, 40, 4, 4)))


@pytest.mark.parametrize(
    ("media", "fmt"), [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/gif", "GIF")]
)
def test_render_encodes(media: str, fmt: str) -> None:
    arr = np.tile(np.arange(64, dtype=np.uint16) * 64, (32, 1))
    data = render.render(
        arr, Dataset(), "MONOCHROME2", 12, media_type=media, window=Window(2048, 4096)
    )
    img = Image.open(io.BytesIO(data))
    assert img.format == fmt and img.size == (64, 32)
    if fmt == "PNG":
        assert np.array_equal(np.asarray(img), render.apply_window(arr, Window(2048, 4096)))
    small = render.render(arr, Dataset(), "MONOCHROME2", 12, media_type=media, fit=16)
    assert Image.open(io.BytesIO(small)).size == (16, 8)
