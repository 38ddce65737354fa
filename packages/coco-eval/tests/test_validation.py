"""Bad input ends in an EvaluationError (or exit status 2 from the CLI) whose message names the problem:
malformed RLEs and polygons (issue 14 item 9), semantic-segmentation arguments and label maps (item 11),
worker counts and other CLI arguments, panoptic PNG modes. Each test gives the bad input and checks the
error type and the words that name it."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_util

from coco_eval import (
    EvaluationError,
    SemSegEvaluator,
    _rle,
    confusion_from_folders,
    confusion_matrix,
    evaluate_instances,
    pq_compute,
    read_label_map,
    read_panoptic_png,
    write_panoptic_png,
)
from coco_eval.cli import main
from coco_eval.panoptic_io import id2rgb

needs_c = pytest.mark.skipif(
    not _rle.speedups_available(), reason="coco_eval._speedups not built (no compiler)"
)


@pytest.fixture(params=["compiled", "numpy"])
def rle_path(request, monkeypatch):
    """Run a test with the compiled RLE check and with the numpy fallback."""
    if request.param == "compiled" and not _rle.speedups_available():
        pytest.skip("coco_eval._speedups not built")
    if request.param == "numpy":
        monkeypatch.setattr(_rle, "_speedups", None)
    return request.param


def _rle_str(mask):
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _gt(h=10, w=11, seg=None, iscrowd=0):
    seg = seg if seg is not None else [[1, 1, 6, 1, 6, 6, 1, 6]]
    return {"images": [{"id": 4, "height": h, "width": w}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 17, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                             "iscrowd": iscrowd, "segmentation": seg}]}  # fmt: skip


def _det(seg, image_id=4):
    return {"image_id": image_id, "category_id": 1, "score": 0.9, "segmentation": seg}


# --- issue 14 item 9: RLE counts that do not add up to h * w ---------------------------------------------


def test_gt_compressed_rle_with_wrong_total_names_the_annotation(rle_path):
    short = _rle_str(np.ones((10, 10)))  # 100 pixels of runs in a 10 x 11 image (110)
    with pytest.raises(EvaluationError, match=r"annotations\[0\] \(id 17, image_id 4\).*do not add up"):
        evaluate_instances(_gt(seg={"size": [10, 11], "counts": short}, iscrowd=1), [], "segm")


def test_gt_uncompressed_rle_with_wrong_total_names_the_annotation():
    with pytest.raises(
        EvaluationError, match=r"annotations\[0\] \(id 17, image_id 4\).*do not add up.*109 != 110"
    ):
        evaluate_instances(_gt(seg={"size": [10, 11], "counts": [0, 50, 59]}, iscrowd=1), [], "segm")


@pytest.mark.parametrize("as_bytes", [False, True])
def test_detection_compressed_rle_with_wrong_total_names_the_record(rle_path, as_bytes):
    short = _rle_str(np.ones((10, 10)))
    dets = [_det({"size": [10, 11], "counts": _rle_str(np.zeros((10, 11)))}),
            _det({"size": [10, 11], "counts": short.encode() if as_bytes else short})]  # fmt: skip
    with pytest.raises(EvaluationError, match=r"detections: \[1\] \(image_id 4\).*do not add up.*110"):
        evaluate_instances(_gt(), dets, "segm")


def test_detection_uncompressed_rle_with_wrong_total_names_the_record():
    with pytest.raises(EvaluationError, match=r"\[0\] \(image_id 4\).*do not add up.*111 != 110"):
        evaluate_instances(_gt(), [_det({"size": [10, 11], "counts": [0, 100, 11]})], "segm")


@pytest.mark.parametrize(
    ("seg", "words"),
    [
        ({"size": [10, 11], "counts": "0!!"}, "not a valid COCO RLE string"),  # '!' is below the alphabet
        (
            {"size": [10, 11], "counts": "0" + chr(48 + 0x20)},
            "not a valid COCO RLE string",
        ),  # cut off mid-count
        ({"size": [10, 11], "counts": [0, -5, 115]}, "negative run"),
        ({"size": [10, 11], "counts": [0, 5.5, 104.5]}, "must hold integers"),
        ({"size": [10, 11], "counts": 7}, "'counts' must be a string"),
        (
            {"size": [10, 10], "counts": _rle_str(np.ones((10, 10)))},
            r"RLE size \[10, 10\] differs from the image size \[10, 11\]",
        ),
        ({"size": "10x11", "counts": "0"}, r"'size' must be \[height, width\]"),
        ({"counts": "0"}, "needs 'size' and 'counts'"),
        ([[1, 1, 5, 5]], "4 coordinates; a polygon needs an even number, at least 6"),
        ([[1, 1, 5, 5, 3]], "5 coordinates"),
        ([[1, 1, 5, float("nan"), 3, 3]], "not a finite number"),
        ([], "non-empty list"),
        (np.ones((3, 3), bool), r"mask shape \[3, 3\] differs from the image size \[10, 11\]"),
        (np.ones((10, 11), np.float32), r"'segmentation' must be an RLE dict, polygons or an \(H, W\)"),
    ],
)
def test_malformed_detection_masks(rle_path, seg, words):
    with pytest.raises(EvaluationError, match=words):
        evaluate_instances(_gt(), [_det(seg)], "segm")


@pytest.mark.parametrize(
    ("seg", "words"),
    [
        ([[1, 1, 5, 5]], r"annotations\[0\] \(id 17, image_id 4\): polygon 0 has 4 coordinates"),
        ([[1, 1, 5, 5, 5, float("inf")]], "not a finite number"),
        ({"size": [10, 11], "counts": "0!!"}, r"annotations\[0\].*not a valid COCO RLE string"),
    ],
)
def test_malformed_gt_masks(rle_path, seg, words):
    with pytest.raises(EvaluationError, match=words):
        evaluate_instances(_gt(seg=seg), [], "segm")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"iscrowd": 2}, "'iscrowd' must be 0 or 1"),
        ({"area": float("nan")}, "'area' must be a finite number"),
        ({"bbox": [0, 0, 1]}, r"'bbox' must be \[x, y, w, h\]"),
        ({"image_id": 5}, "image_id 5 is not in 'images'"),
    ],
)
def test_malformed_gt_fields(change, words):
    gt = _gt()
    gt["annotations"][0].update(change)
    with pytest.raises(EvaluationError, match=words):
        evaluate_instances(gt, [], "bbox")


def test_duplicate_image_and_category_ids():
    gt = _gt()
    gt["images"].append(dict(gt["images"][0]))
    with pytest.raises(EvaluationError, match="duplicate image id 4"):
        evaluate_instances(gt, [], "bbox")
    gt = _gt()
    gt["categories"].append({"id": 1, "name": "b"})
    with pytest.raises(EvaluationError, match="duplicate category id 1"):
        evaluate_instances(gt, [], "bbox")


@pytest.mark.parametrize(
    ("det", "words"),
    [
        ({"score": True}, "'score' must be a finite number"),
        ({"score": "0.5"}, "'score' must be a finite number"),
        ({"score": float("inf")}, "'score' must be a finite number"),
        ({"bbox": [0, 0, "1", 1]}, "4 finite numbers"),
        ({"bbox": [0, 0, float("nan"), 1]}, "4 finite numbers"),
        ({"image_id": [4]}, "image_id must be an integer"),
    ],
)
def test_malformed_detection_fields(det, words):
    rec = dict({"image_id": 4, "category_id": 1, "score": 0.5, "bbox": [0, 0, 2, 2]}, **det)
    with pytest.raises(EvaluationError, match=words):
        evaluate_instances(_gt(), [rec], "bbox")


def test_bad_arguments():
    with pytest.raises(EvaluationError, match="max_dets must be >= 3 increasing"):
        evaluate_instances(_gt(), [], "bbox", max_dets=(10, 1, 100))
    with pytest.raises(EvaluationError, match="backend must be one of"):
        evaluate_instances(_gt(), [], "bbox", backend="fast")


def _encode_counts(counts):
    """COCO's compressed-string encoding of a run list (as pycocotools' rleToString), for building RLEs
    whose runs are arbitrary (valid or not)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(runs=st.lists(st.integers(-3, 40), min_size=0, max_size=12), extra=st.sampled_from([0, 0, 0, 1, -1]))
def test_compressed_check_matches_a_direct_sum(runs, extra):
    # the compiled and the numpy check agree with the definition: valid iff every run >= 0 and they add up
    s = _encode_counts(runs)
    total = sum(runs) + extra
    valid = all(r >= 0 for r in runs) and extra == 0
    expected = sum(runs[1::2]) if valid else None
    results = [_rle.check_compressed([s], [total], use_c=False)[0]]
    if _rle.speedups_available():
        results.append(_rle.check_compressed([s], [total], use_c=True)[0])
    for r in results:
        assert (r >= 0) == valid
        if valid:
            assert r == expected


@needs_c
def test_compiled_area_and_box_match_pycocotools():
    r = np.random.default_rng(5)
    rles = []
    for _ in range(300):
        h, w = (int(v) for v in r.integers(1, 12, 2))
        m = (r.random((h, w)) < r.random()).astype(np.uint8)
        rles.append(mask_util.encode(np.asfortranarray(m)))
    sizes = np.array([rle["size"] for rle in rles])
    areas, boxes = _rle.area_and_bbox([rle["counts"].decode() for rle in rles], sizes)
    np.testing.assert_array_equal(areas, [mask_util.area(rle) for rle in rles])
    np.testing.assert_array_equal(boxes, [mask_util.toBbox(rle) for rle in rles])


# --- issue 14 item 11: semantic segmentation arguments and label maps --------------------------------------


@pytest.mark.parametrize(("num_classes", "words"), [(-3, "num_classes must be an integer >= 1, got -3"),
                                                    (0, ">= 1"), (2.5, "integer"), (True, "integer")])  # fmt: skip
def test_semantic_num_classes(num_classes, words):
    with pytest.raises(EvaluationError, match=words):
        SemSegEvaluator(num_classes)
    with pytest.raises(EvaluationError, match=words):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), num_classes)


def test_semantic_ignore_label_and_inputs():
    with pytest.raises(EvaluationError, match="ignore_label=1 is a class index"):
        SemSegEvaluator(3, ignore_label=1)
    with pytest.raises(EvaluationError, match="labels must be integers"):
        confusion_matrix(np.full((2, 2), 0.5), np.zeros((2, 2), int), 3)
    with pytest.raises(EvaluationError, match="class names for num_classes=3"):
        SemSegEvaluator(3, class_names=["a"])
    ev = SemSegEvaluator(3)
    with pytest.raises(EvaluationError, match=r"expected \(H, W\) labels or \(3, H, W\) scores"):
        ev.process(
            [{"sem_seg": np.zeros((3, 4), int)}], [{"sem_seg": np.zeros((3, 4, 3), np.uint8)}]
        )  # an RGB image


def _label_dirs(tmp_path, gt_img, pred_img, name="a.png"):
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir(exist_ok=True)
    gt_img.save(tmp_path / "gt" / name)
    pred_img.save(tmp_path / "pred" / name)
    return tmp_path / "gt", tmp_path / "pred"


def test_rgb_label_map_is_rejected_and_palette_is_read_as_indices(tmp_path):
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    rgb = Image.fromarray(np.stack([labels * 50] * 3, axis=-1))
    gt_dir, pred_dir = _label_dirs(tmp_path, Image.fromarray(labels), rgb)
    with pytest.raises(EvaluationError, match=r"a\.png.*mode RGB \(3 channels\).*single-channel"):
        confusion_from_folders(gt_dir, pred_dir, 3)
    pal = Image.fromarray(labels, mode="L").convert("P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.save(pred_dir / "a.png")
    assert read_label_map(pred_dir / "a.png").tolist() == labels.tolist()  # indices, not colours
    conf, n = confusion_from_folders(gt_dir, pred_dir, 3)
    assert n == 1 and np.trace(conf) == 4


def test_semantic_folders(tmp_path):
    labels = Image.fromarray(np.zeros((2, 2), np.uint8))
    gt_dir, pred_dir = _label_dirs(tmp_path, labels, labels)
    with pytest.raises(EvaluationError, match="prediction folder .*nope.* does not exist"):
        confusion_from_folders(gt_dir, tmp_path / "nope", 2)
    labels.save(gt_dir / "b.png")
    with pytest.raises(EvaluationError, match=r"1 ground-truth files have no prediction.*'b\.png'"):
        confusion_from_folders(gt_dir, pred_dir, 2)
    labels.save(pred_dir / "b.png")
    labels.save(pred_dir / "c.png")
    with pytest.raises(EvaluationError, match=r"1 predictions .* have no ground truth.*'c\.png'"):
        confusion_from_folders(gt_dir, pred_dir, 2)
    (pred_dir / "c.png").unlink()
    Image.fromarray(np.zeros((3, 2), np.uint8)).save(pred_dir / "b.png")
    with pytest.raises(EvaluationError, match=r"b\.png.*size \(3, 2\) differs"):
        confusion_from_folders(gt_dir, pred_dir, 2)
    with pytest.raises(EvaluationError, match="workers must be an integer >= 1"):
        confusion_from_folders(gt_dir, pred_dir, 2, workers=-1)
    (pred_dir / "b.png").write_bytes(b"not a png")
    with pytest.raises(EvaluationError, match=r"b\.png.*cannot be read"):
        confusion_from_folders(gt_dir, pred_dir, 2)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--num-classes", "-3"], "--num-classes must be >= 1, got -3"),
        (["--num-classes", "two"], "--num-classes must be an integer"),
        (["--num-classes", "2", "--workers", "-1"], "--workers .* must be >= 0, got -1"),
        (["--num-classes", "2", "--ignore", "1"], "ignore_label=1 is a class index"),
    ],
)
def test_cli_semantic_arguments(tmp_path, capsys, args, words):
    labels = Image.fromarray(np.zeros((2, 2), np.uint8))
    gt_dir, pred_dir = _label_dirs(tmp_path, labels, labels)
    try:
        rc = main(["semantic", "--gt-dir", str(gt_dir), "--pred-dir", str(pred_dir), *args])
    except SystemExit as e:  # argparse rejects the value with a usage line
        rc = e.code
    assert rc == 2
    import re

    assert re.search(words, capsys.readouterr().err)


def test_cli_semantic_parallel_equals_serial(tmp_path):
    r = np.random.default_rng(0)
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    for i in range(20):
        gt = r.integers(0, 4, (6, 7)).astype(np.uint8)
        gt[r.random((6, 7)) < 0.1] = 255
        Image.fromarray(gt).save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray(r.integers(0, 4, (6, 7)).astype(np.uint8)).save(tmp_path / "pred" / f"{i}.png")
    one, _ = confusion_from_folders(tmp_path / "gt", tmp_path / "pred", 4, workers=1)
    two, _ = confusion_from_folders(tmp_path / "gt", tmp_path / "pred", 4, workers=2, progress=True)
    expected = sum(confusion_matrix(read_label_map(tmp_path / "pred" / f"{i}.png"),
                                    read_label_map(tmp_path / "gt" / f"{i}.png"), 4) for i in range(20))  # fmt: skip
    np.testing.assert_array_equal(one, expected)
    np.testing.assert_array_equal(two, expected)
    out = tmp_path / "m.json"
    assert main(["semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred"),
                 "--num-classes", "4", "--workers", "0", "--json-out", str(out)]) == 0  # fmt: skip
    assert "sem_seg/mIoU" in json.loads(out.read_text())


# --- panoptic and instances CLI arguments ------------------------------------------------------------------


def _panoptic_set(tmp_path):
    ids = np.array([[1, 1, 2], [2, 0, 2]])
    (tmp_path / "pan").mkdir()
    write_panoptic_png(tmp_path / "pan" / "x.png", ids)
    pan = {"annotations": [{"image_id": 1, "file_name": "x.png", "segments_info": [
        {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]}],
        "categories": [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}]}  # fmt: skip
    (tmp_path / "pan.json").write_text(json.dumps(pan))
    return ["--gt-json", str(tmp_path / "pan.json"), "--gt-dir", str(tmp_path / "pan"),
            "--pred-json", str(tmp_path / "pan.json"), "--pred-dir", str(tmp_path / "pan")]  # fmt: skip


@pytest.mark.parametrize("workers", ["-1", "x", "1.5"])
def test_cli_panoptic_rejects_bad_workers(tmp_path, capsys, workers):
    with pytest.raises(SystemExit) as e:
        main(["panoptic", *_panoptic_set(tmp_path), "--workers", workers])
    assert e.value.code == 2 and "--workers" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [-1, "2", 1.0, True])
def test_pq_compute_rejects_bad_workers(tmp_path, workers):
    _panoptic_set(tmp_path)
    with pytest.raises(EvaluationError, match="workers must be an integer >= 1"):
        pq_compute(
            tmp_path / "pan.json", tmp_path / "pan", tmp_path / "pan.json", tmp_path / "pan", workers=workers
        )


def test_cli_panoptic_ok_and_errors(tmp_path, capsys):
    args = _panoptic_set(tmp_path)
    out = tmp_path / "p.json"
    assert main(["panoptic", *args, "--workers", "0", "--progress", "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["All"]["pq"] == 1.0 and res["backend"] == "coco-eval"
    assert main(["panoptic", *args, "--json-out", str(tmp_path / "no" / "dir" / "p.json")]) == 2
    assert "cannot write --json-out" in capsys.readouterr().err
    # a PNG id that segments_info lacks, through the compiled PNG path and the PIL path alike
    write_panoptic_png(tmp_path / "pan" / "x.png", np.array([[1, 1, 2], [2, 9, 2]]))
    assert main(["panoptic", *args]) == 2
    assert "segment ids [9] are in the PNG but not in segments_info" in capsys.readouterr().err


def test_cli_instances_arguments(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(_gt()))
    (tmp_path / "dt.json").write_text("[]")
    base = ["instances", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--max-dets", "1", "10", "0"])
    assert e.value.code == 2 and "--max-dets must be >= 1" in capsys.readouterr().err
    assert main([*base, "--max-dets", "10", "1", "100"]) == 2
    assert "max_dets must be >= 3 increasing" in capsys.readouterr().err
    assert main(["instances", "--gt", str(tmp_path / "missing.json"), "--dt", str(tmp_path / "dt.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main([*base, "--no-cats", "--backend", "pycocotools"]) == 0


# --- panoptic PNGs -------------------------------------------------------------------------------------------


def test_panoptic_png_io(tmp_path):
    ids = np.array([[0, 1, 70000], [2**24 - 1, 5, 5]])
    write_panoptic_png(tmp_path / "a.png", ids)
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "a.png"), ids)
    Image.fromarray(np.concatenate([id2rgb(ids), np.full((2, 3, 1), 255, np.uint8)], axis=-1)).save(
        tmp_path / "b.png"
    )
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "b.png"), ids)  # RGBA: alpha ignored
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(EvaluationError, match=r"c\.png.*mode L.*RGB"):
        read_panoptic_png(tmp_path / "c.png")
    with pytest.raises(EvaluationError, match=r"ids must lie in \[0, 2\^24\)"):
        write_panoptic_png(tmp_path / "d.png", np.array([[2**24]]))
    with pytest.raises(EvaluationError, match=r"expected \(H, W\) ids"):
        write_panoptic_png(tmp_path / "d.png", np.zeros((2, 2, 3), int))
    (tmp_path / "e.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])
    with pytest.raises(EvaluationError, match=r"e\.png.*cannot be read"):
        read_panoptic_png(tmp_path / "e.png")
    with pytest.raises(EvaluationError, match="does not exist"):
        read_panoptic_png(tmp_path / "missing.png")
