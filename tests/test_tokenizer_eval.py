"""`unitok.evaluate` on a tiny folder with a tiny random Inception; the linear probe on frozen features."""
import json
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from unitok import preset, UniTok
from unitok.evaluate import check_local_weights, codebook_stats, main, psnr_ssim


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A torch-fidelity InceptionV3 state dict with random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inc") / "inception.pth"
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        for m in net.modules():  # variance-preserving init so random features do not vanish
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def _folder(root, n=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("argv,message", [
    ([], "give --images, --zeroshot-dir and/or --probe-dir"),
    (["--zeroshot-dir", "zs", "--inception-weights", "w.pth"], "--inception-weights does not apply without --images"),
    (["--images", "ref", "--classnames", "imagenet"], "--classnames does not apply without --zeroshot-dir"),
])
def test_flags_of_the_other_evaluation_are_errors(argv, message, capsys):
    from unitok.evaluate import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--tokenizer", "t", *argv])
    assert e.value.code == 2 and message in " ".join(capsys.readouterr().err.replace("│", "").split())
    cfg = parse_args(["--tokenizer", "t", "--images", "ref", "--inception-weights", "w", "--zeroshot-dir", "zs",
                      "--classnames", "imagenet", "--local_rank=0"])  # both together: every flag applies
    assert (cfg.inception_weights, cfg.classnames, cfg.size, cfg.local_rank) == ("w", "imagenet", 256, 0)


def test_reconstruction_metrics_and_fid(tmp_path, random_inception):
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    imgs = _folder(tmp_path / "imgs")
    main(["--tokenizer", str(tmp_path / "tok"), "--images", str(imgs), "--size", "32", "--out", str(tmp_path / "o"),
          "--inception-weights", str(random_inception)])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["num_images"] == 6 and len(list((tmp_path / "o" / "recon").glob("*.png"))) == 6
    assert 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1
    assert len(m["codebook_usage_pct"]) == 4 and 0 < m["mean_usage_pct"] <= 100
    assert m["rfid"] >= 0 and m["is"] > 0


def test_inception_weights_of_another_layout_are_refused_by_name_and_shape(tmp_path, random_inception):
    """The check compares the file with torch-fidelity's own extractor (built without weights): another network's
    file (a DINOv2-like state dict), a missing tensor or another shape are refused, naming the file and the flag."""
    good = torch.load(random_inception, weights_only=True)
    assert check_local_weights(random_inception) == random_inception
    dino = {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 14, 14)}
    short = {k: v for k, v in good.items() if k != "fc.weight"}
    reshaped = {**good, "fc.bias": torch.zeros(1000)}
    for name, state, message in (("dino.pth", dino, "unexpected (e.g. cls_token"),
                                 ("short.pth", short, "1 missing (e.g. fc.weight)"),
                                 ("reshaped.pth", reshaped, "1 with another shape (e.g. fc.bias (1000,) (expected "
                                                            "(1008,))")):
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match="not torch-fidelity's inception-v3-compat state dict") as err:
            check_local_weights(tmp_path / name)
        assert f"--inception-weights {tmp_path / name}" in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.parametrize("bad", ["missing", "wrong_layout"])
def test_bad_inception_weights_fail_before_the_reconstruction_pass(tmp_path, bad):
    """A mistyped or wrong --inception-weights stops the run before the tokenizer loads: no PNG is written and no
    reconstruction time is spent on a run that cannot write its metrics."""
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    weights = tmp_path / "inception.pth"
    if bad == "wrong_layout":
        torch.save({"cls_token": torch.zeros(1, 1, 8)}, weights)
    with mock.patch("unitok.loading.load_tokenizer", side_effect=AssertionError("the tokenizer was loaded")), \
            pytest.raises(FileNotFoundError if bad == "missing" else ValueError, match="--inception-weights"):
        main(["--tokenizer", str(tmp_path / "tok"), "--images", str(_folder(tmp_path / "imgs")), "--size", "32",
              "--out", str(tmp_path / "o"), "--inception-weights", str(weights)])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["missing_images", "missing_zeroshot_dir", "probe_class_of_one", "zeroshot_empty",
                                 "imagenet_count", "imagenet_names"])
def test_bad_inputs_fail_before_the_tokenizer_loads(tmp_path, bad):
    """Every input of the later evaluations is checked before the tokenizer loads: a mistyped folder, a probe
    class of one image or folders --classnames imagenet cannot name used to fail after the whole reconstruction
    pass, losing its results (no metrics.json)."""
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    imgs, zs = _folder(tmp_path / "imgs", n=2, size=32), tmp_path / "zs"
    extra, error, msg = {  # built lazily: each case makes only its own folders
        "missing_images": lambda: (["--images", str(tmp_path / "typo")], FileNotFoundError, "image folder not found"),
        "missing_zeroshot_dir": lambda: (["--zeroshot-dir", str(tmp_path / "typo")], FileNotFoundError,
                                         "--zeroshot-dir .*typo: no such folder"),
        "probe_class_of_one": lambda: (["--probe-dir", str(_folder(tmp_path / "pd" / "a", n=1, size=32).parent)],
                                       ValueError, "class 'a' has 1 image"),
        "zeroshot_empty": lambda: (["--zeroshot-dir", str(_folder(tmp_path / "flat", n=1, size=32))], ValueError,
                                   "--zeroshot-dir .*flat is not an ImageFolder"),
        "imagenet_count": lambda: (["--zeroshot-dir", str(_n_image_classes(zs, ["n00000001", "n00000002"])),
                                    "--classnames", "imagenet"], ValueError, "needs 1000 class folders, found 2"),
        "imagenet_names": lambda: (["--zeroshot-dir", str(_n_image_classes(zs, [f"c{i}" for i in range(1000)])),
                                    "--classnames", "imagenet"], ValueError, "named by wnid"),
    }[bad]()
    if bad != "missing_images":
        extra = ["--images", str(imgs), *extra]
    with mock.patch("unitok.loading.load_tokenizer", side_effect=AssertionError("the tokenizer was loaded")), \
            pytest.raises(error, match=msg):
        main(["--tokenizer", str(tmp_path / "tok"), "--size", "32", "--out", str(tmp_path / "o"), *extra])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("images, out", [
    ("imgs", "imgs/eval"),  # a rerun would list the first run's PNGs as inputs, then delete them
    ("imgs", "imgs"),
    ("o/reference", "o"),  # re-scoring a run's reference crops in place would delete them first
    ("o/recon/sub", "o"),
])
def test_out_overlapping_images_is_refused(tmp_path, monkeypatch, capsys, images, out):
    """recon/ and reference/ of --out are emptied by the run and --images is read recursively: an --out whose
    recon/ or reference/ is, lies in or contains --images is refused when the flags are parsed."""
    from unitok.evaluate import parse_args

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        parse_args(["--tokenizer", "t", "--images", images, "--out", out])
    assert e.value.code == 2 and "overlaps --images" in " ".join(capsys.readouterr().err.replace("│", "").split())
    assert parse_args(["--tokenizer", "t", "--images", "o/imgs", "--out", "o"]).out == "o"  # beside them: fine


def test_size_must_be_a_multiple_of_16(capsys):
    """--size 40 used to pass the flags and fail in encode, after the tokenizer loaded and --out was cleared."""
    from unitok.evaluate import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--tokenizer", "t", "--images", "ref", "--size", "40"])
    assert e.value.code == 2 and "--size 40 must be a multiple of 16" in " ".join(capsys.readouterr().err.split())


def test_a_failed_rerun_leaves_no_earlier_metrics_json(tmp_path):
    """metrics.json is removed with recon/ and reference/ at the start, so a rerun that fails after its pass does
    not leave the earlier run's numbers beside its own PNGs; a write cut short leaves no metrics.json either."""
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    out = tmp_path / "o"
    argv = ["--tokenizer", str(tmp_path / "tok"), "--size", "32", "--out", str(out)]
    main([*argv, "--images", str(_folder(tmp_path / "six", size=32))])
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 6
    two = ["--images", str(_folder(tmp_path / "two", n=2, size=32, seed=1))]
    with mock.patch("unitok.evaluate.codebook_stats", side_effect=RuntimeError("failed after the pass")), \
            pytest.raises(RuntimeError, match="after the pass"):
        main([*argv, *two])
    assert not (out / "metrics.json").exists() and len(list((out / "recon").glob("*.png"))) == 2

    from pathlib import Path
    write_text = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if "metrics.json" in self.name:
            write_text(self, data[: len(data) // 2])
            raise OSError("no space left on device")
        return write_text(self, data, *args, **kwargs)

    with mock.patch.object(Path, "write_text", disk_full), pytest.raises(OSError, match="no space"):
        main([*argv, *two])
    assert sorted(p.name for p in out.iterdir()) == ["recon", "reference"]


def test_attn_mode_must_match_a_checkpoint_folder_and_is_recorded(tmp_path):
    """A folder records its attention mode: --attn-mode that differs is refused (it used to be ignored silently),
    before anything is cleared; metrics.json records the mode and the tokenizer's fingerprint."""
    from unitok import load_tokenizer

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "full")
    UniTok(preset("debug", ["--projection.attn-mode=causal"])).save_pretrained(tmp_path / "causal")
    imgs = _folder(tmp_path / "imgs", n=2, size=32)
    argv = ["--images", str(imgs), "--size", "32", "--out", str(tmp_path / "o")]
    main(["--tokenizer", str(tmp_path / "full"), *argv])
    before = (tmp_path / "o" / "metrics.json").read_text()
    with pytest.raises(ValueError, match="--attn-mode causal: the checkpoint folder .*full has full projection"):
        main(["--tokenizer", str(tmp_path / "full"), *argv, "--attn-mode", "causal"])
    assert (tmp_path / "o" / "metrics.json").read_text() == before
    assert json.loads(before)["attn_mode"] == "full"
    for extra in ([], ["--attn-mode", "causal"]):  # a causal folder needs no flag; the matching one is accepted
        main(["--tokenizer", str(tmp_path / "causal"), *argv, *extra])
        m = json.loads((tmp_path / "o" / "metrics.json").read_text())
        assert m["attn_mode"] == "causal"
        assert m["tokenizer_fingerprint"] == load_tokenizer(tmp_path / "causal").fingerprint()
        assert m["tokenizer_fingerprint"] != json.loads(before)["tokenizer_fingerprint"]


def test_rerun_into_the_same_out_scores_only_its_own_images(tmp_path):
    """torch-fidelity reads whole folders, so recon/ and reference/ are emptied first: a second run with fewer
    images leaves only its own PNGs, named by the image's index in the sorted folder on every rank."""
    from unitok import load_tokenizer
    from unitok.evaluate import evaluate_reconstruction, list_images, load_val_image, to_uint8

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    argv = ["--tokenizer", str(tmp_path / "tok"), "--size", "32", "--out", str(tmp_path / "o")]
    main([*argv, "--images", str(_folder(tmp_path / "six"))])
    two = _folder(tmp_path / "two", n=2, seed=1)
    main([*argv, "--images", str(two)])
    for sub in ("recon", "reference"):
        assert sorted(p.name for p in (tmp_path / "o" / sub).iterdir()) == ["000000.png", "000001.png"]
    ref = np.asarray(Image.open(tmp_path / "o" / "reference" / "000001.png"))
    assert np.array_equal(ref, to_uint8(load_val_image(two / "1.png", 32)))
    images = list_images(tmp_path / "six")
    evaluate_reconstruction(load_tokenizer(tmp_path / "tok"), images, 32, tmp_path / "r1", 2, rank=1, world=2)
    assert sorted(p.name for p in (tmp_path / "r1" / "recon").iterdir()) == ["000001.png", "000003.png", "000005.png"]


def test_val_images_are_read_like_training_reads_them(tmp_path):
    """Transparent pixels composite on white (unitok.image_io.load_image), not black as PIL's convert("RGB")."""
    from unitok.evaluate import load_val_image

    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[:, 24:] = (0, 0, 0, 255)  # right half opaque black, left half transparent (black underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_val_image(tmp_path / "rgba.png", 32)  # 48x40 -> 38x32, centre crop from x = 3
    assert torch.equal(x[:, :, :10], torch.ones(3, 32, 10)) and torch.equal(x[:, :, 24:], -torch.ones(3, 32, 8))


def test_zero_shot_on_image_folder(tmp_path, capsys):
    """The CLI's accuracies equal an independent per-image computation (7 classes, so top-5 < 100 is
    possible): class weights = renormalised mean of the normalised template embeddings (open_clip's rule),
    with OpenAI's ImageNet templates by default and with the lines of a --templates file."""
    import open_clip
    import torch.nn.functional as F
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from unitok import load_tokenizer
    from unitok.evaluate import load_val_image, parse_args

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    classes = ["blue_square", "green_star", "orange_cross", "pink_ring", "purple_heart", "red_circle", "white_moon"]
    for i, cls in enumerate(classes):
        _folder(tmp_path / "zs" / cls, n=2, size=32, seed=i)
    model = load_tokenizer(tmp_path / "tok").eval()
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.cfg.text.context_length)

    @torch.no_grad()
    def independent(templates):
        w = []
        for c in classes:
            e = model.encode_text(tok([t(c.replace("_", " ")) for t in templates]), normalize=True)
            w.append(F.normalize(e.mean(0), dim=0))
        w = torch.stack(w, 1)  # (D, 7)
        top1 = top5 = 0
        for label, cls in enumerate(classes):
            for path in sorted((tmp_path / "zs" / cls).iterdir()):
                s = (model.encode_image(load_val_image(path, 32)[None], normalize=True) @ w)[0]
                order = s.argsort(descending=True).tolist()
                top1 += order[0] == label
                top5 += label in order[:5]
        return 100 * top1 / 14, 100 * top5 / 14

    custom = ["a drawing of a {} on white", "{}, small", "the {} in the middle"]
    (tmp_path / "templates.txt").write_text("\n".join(custom) + "\n\n")  # blank lines are skipped
    for name, extra, templates in (("o", [], OPENAI_IMAGENET_TEMPLATES),
                                   ("o2", ["--templates", str(tmp_path / "templates.txt")],
                                    [lambda c, t=t: t.format(c) for t in custom])):
        from open_clip import zero_shot_classifier as zsc

        with mock.patch.object(zsc, "build_zero_shot_classifier", wraps=zsc.build_zero_shot_classifier) as built:
            main(["--tokenizer", str(tmp_path / "tok"), "--zeroshot-dir", str(tmp_path / "zs"), "--size", "32",
                  "--out", str(tmp_path / name), "--batch-size", "3", *extra])
        used = built.call_args.args[3]  # the templates the classifier was built from
        assert [t("X") if callable(t) else t.format("X") for t in used] == [t("X") for t in templates]
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["zeroshot_images"] == 14 and m["zeroshot_classes"] == 7
        top1, top5 = independent(templates)
        assert m["zeroshot_top1"] == pytest.approx(top1) and m["zeroshot_top5"] == pytest.approx(top5)

    # a templates file without exactly one {} per line, or a missing one, is refused before the model loads
    (tmp_path / "bad.txt").write_text("a photo of a {}\na photo\n")
    for spec, msg in ((tmp_path / "bad.txt", "exactly one '{}' for the class name; bad: line 2 'a photo'"),
                      (tmp_path / "nope.txt", "no such file")):
        with pytest.raises(SystemExit) as e:
            parse_args(["--tokenizer", "t", "--zeroshot-dir", "zs", "--templates", str(spec)])
        assert e.value.code == 2 and msg in " ".join(capsys.readouterr().err.replace("│", "").split())


@pytest.mark.parametrize("line", ["a photo of a {} in {style}.", "a {0} photo of a {}.", "a photo of a {}}.",
                                  "a photo of a {0}.", "a photo of a {:{}}."])
def test_templates_that_str_format_cannot_fill_are_refused_naming_file_and_line(tmp_path, line):
    """Each of these has one '{}' but fails (or needs a manual index) in open_clip's `template.format(name)`,
    which ran only after the reconstruction pass."""
    from unitok.evaluate import read_templates

    path = tmp_path / "t.txt"
    path.write_text(f"a photo of a {{}}.\n\n{line}\n")
    with pytest.raises(ValueError, match="exactly one") as e:
        read_templates(str(path))
    assert f"--templates {path}" in str(e.value) and f"line 3 {line!r}" in str(e.value)
    path.write_text("a {{literal}} photo of a {}.\n{!r}\n{:>6}\n")  # escaped braces, conversion, spec: fine
    assert [t.format("cat") for t in read_templates(str(path))] == ["a {literal} photo of a cat.", "'cat'", "   cat"]


def _n_image_classes(root, names):
    """An ImageFolder of one (empty) .png per class: enough for its listing, which opens no file."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"")
    return root


def test_imagenet_classnames_follow_wnid_or_index_folder_names(tmp_path):
    """--classnames imagenet maps IMAGENET_CLASSNAMES (sorted-wnid order) onto ImageFolder's sorted folders: wnid
    folders in order, index folders by int(name) (ImageFolder sorts "10" before "2", which used to shift the
    names onto the wrong classes), anything else refused."""
    from open_clip import zero_shot_classifier as zsc
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torchvision.datasets import ImageFolder

    from unitok.evaluate import zero_shot

    torch.manual_seed(0)
    model = UniTok(preset("debug")).eval()

    class Built(Exception):
        pass

    def names_used(folder):
        def capture(model, tok, names, *args, **kwargs):
            raise Built(names)

        with mock.patch.object(zsc, "build_zero_shot_classifier", capture), pytest.raises(Built) as e:
            zero_shot(model, folder, "imagenet", 32)
        return e.value.args[0]

    for layout, name_of in (("wnid", lambda i: f"n{i:08d}"), ("index", str), ("padded", lambda i: f"{i:04d}")):
        folder = _n_image_classes(tmp_path / layout, [name_of(i) for i in range(1000)])
        names, to_idx = names_used(folder), ImageFolder(str(folder)).class_to_idx
        assert all(names[to_idx[name_of(i)]] == IMAGENET_CLASSNAMES[i] for i in range(1000)), layout
    for layout, folders, msg in (
            ("words", [f"class_{i}" for i in range(1000)], "named by wnid .* found e.g. 'class_0'"),
            ("gap", [str(i) for i in range(1, 1001)], "named by index must be 0 ... 999"),
            ("few", ["n00000001", "n00000002"], "needs 1000 class folders, found 2")):
        with pytest.raises(ValueError, match=msg):
            names_used(_n_image_classes(tmp_path / layout, folders))


class NotATensor:
    """An arbitrary class that a weights_only load must refuse."""


def test_metric_helpers(tmp_path):
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr_ssim(a, a) == (100.0, 1.0)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr_ssim(a, b)[0] == pytest.approx(10 * np.log10(255 ** 2 / (255 ** 2 / 192)), rel=1e-6)
    s = codebook_stats(torch.tensor([[5.0, 5.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert s["usage_pct"] == [50.0, 100.0]
    assert s["perplexity"] == pytest.approx([2.0, 4.0])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        check_local_weights(tmp_path / "nope.pth")

    torch.save({"x": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing"):
        check_local_weights(tmp_path / "evil.pth")


def test_probe_split_alternates_within_each_class():
    from unitok.evaluate import probe_split

    train, test = probe_split([0, 0, 0, 1, 1, 0, 2])  # class 0 at 0, 1, 2, 5; class 1 at 3, 4; class 2 at 6
    assert (train, test) == ([0, 2, 3, 6], [1, 4, 5])


def test_linear_probe_fits_separable_features_and_not_random_labels():
    """Gaussian clusters (5 classes, 16-d, L2-normalised like encode_image) are learned; labels that carry no
    information about the features are not (chance is 20 %)."""
    import torch.nn.functional as F

    from unitok.evaluate import linear_probe_top1, probe_split

    g = torch.Generator().manual_seed(0)
    C, per, D = 5, 20, 16
    y = torch.arange(C).repeat_interleave(per)
    centres = torch.randn(C, D, generator=g)
    x = F.normalize(centres[y] + 0.3 * torch.randn(C * per, D, generator=g), dim=1)
    tr, te = probe_split(y.tolist())
    assert linear_probe_top1(x[tr], y[tr], x[te], y[te], C) >= 95.0
    noise = F.normalize(torch.randn(C * per, D, generator=g), dim=1)
    assert linear_probe_top1(noise[tr], y[tr], noise[te], y[te], C) <= 45.0


def _colour_folder(root, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for name, rgb in [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def _main_metrics(tmp_path, argv, name):
    main(["--tokenizer", str(tmp_path / "tok"), "--size", "32", "--out", str(tmp_path / name), *argv])
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_linear_probe_on_image_folder(tmp_path):
    """The CLI's probe equals an independent pass (per-image encode_image, the split rule, the fit); colour
    classes are separable even for a random tokenizer, so it is far above chance (33 %); ranks' shares of
    the features add up to the whole."""
    from unitok import load_tokenizer
    from unitok.evaluate import image_features, linear_probe_top1, load_val_image, probe_split

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    folder = _colour_folder(tmp_path / "probe")
    main(["--tokenizer", str(tmp_path / "tok"), "--probe-dir", str(folder), "--size", "32",
          "--out", str(tmp_path / "o"), "--batch-size", "5"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (m["probe_classes"], m["probe_train_images"], m["probe_test_images"]) == (3, 6, 6)
    assert m["probe_top1"] >= 90.0

    model = load_tokenizer(tmp_path / "tok").eval()
    paths = [p for c in ("blue", "green", "red") for p in sorted((folder / c).iterdir())]  # ImageFolder's order
    y = torch.arange(3).repeat_interleave(4)
    with torch.no_grad():
        x = torch.cat([model.encode_image(load_val_image(p, 32)[None], normalize=True) for p in paths])
    tr, te = probe_split(y.tolist())
    assert m["probe_top1"] == pytest.approx(linear_probe_top1(x[tr], y[tr], x[te], y[te], 3))
    shares = [image_features(model, paths, 32, batch_size=2, rank=r, world=2) for r in (0, 1)]
    assert torch.allclose(shares[0] + shares[1], x, atol=1e-5) and not shares[0][1::2].any()

    # with the zero-shot folder as probe folder one encoding pass feeds both; the numbers do not change
    both = _main_metrics(tmp_path, ["--zeroshot-dir", str(folder), "--probe-dir", str(folder)], "both")
    alone = _main_metrics(tmp_path, ["--zeroshot-dir", str(folder)], "zs")
    assert both["probe_top1"] == m["probe_top1"] and both["zeroshot_top1"] == alone["zeroshot_top1"]
    assert both["zeroshot_top5"] == alone["zeroshot_top5"]

    for p in (folder / "red").iterdir():
        if p.name != "0.png":
            p.unlink()
    with pytest.raises(ValueError, match="class 'red' has 1 image"):
        main(["--tokenizer", str(tmp_path / "tok"), "--probe-dir", str(folder), "--size", "32",
              "--out", str(tmp_path / "o2")])
