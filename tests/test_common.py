"""Tests of common.py: loaders on fake files in the real formats, shapes, splits, the GPU
loader's augmentation, hierarchies, backbones, and the training loop's resume and failure paths."""

import argparse
import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import coarse_outer_product
import common
import hdl_stack
import hiernet
import latent_string
import merged_resnet


def write_fake_cifar100(root, n_train=40, n_test=20):
    """Tiny files in torchvision's cifar-100-python layout (Python-2 style bytes keys)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine_names = [f"fine{i}" for i in range(10)]
    coarse_names = [f"coarse{i}" for i in range(5)]
    fine_to_coarse = np.array([3, 1, 4, 0, 2, 2, 0, 1, 4, 3])
    truth = {}
    for part, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 10
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        obj = {
            b"data": data,
            b"fine_labels": fine.tolist(),
            b"coarse_labels": fine_to_coarse[fine].tolist(),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        (base / part).write_bytes(pickle.dumps(obj, protocol=2))
        truth[part] = (data, fine)
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return truth, fine_names, coarse_names, fine_to_coarse


def test_cifar100_reader_reads_fine_and_coarse_labels(tmp_path):
    truth, fine_names, coarse_names, fine_to_coarse = write_fake_cifar100(tmp_path)
    train, test, hierarchy = common.load_cifar100(tmp_path)
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8
    # Pixel (channel 1, row 2, column 5) sits at 1024 + 2 * 32 + 5 in CIFAR's row-major layout.
    assert train.images[7, 1, 2, 5].item() == truth["train"][0][7, 1024 + 2 * 32 + 5]
    assert torch.equal(test.labels, torch.as_tensor(truth["test"][1]))
    assert hierarchy.class_names == [coarse_names, fine_names]
    assert hierarchy.parents[0].tolist() == fine_to_coarse.tolist()
    assert hierarchy.labels("coarse", test.labels).tolist() == fine_to_coarse[truth["test"][1]].tolist()


def test_cifar10_reader_without_md5(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(range(10))
        obj = {b"data": np.full((10, 3072), len(name), dtype=np.uint8), b"labels": labels}
        (base / name).write_bytes(pickle.dumps(obj, protocol=2))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))
    train, test, hierarchy = common.load_cifar10(tmp_path)
    assert len(train) == 50 and len(test) == 10
    assert hierarchy.class_names[0] == ["vehicles", "animals"]
    vehicles = {names[i] for i in hierarchy.children(0, 0)}
    assert vehicles == {"airplane", "automobile", "ship", "truck"}


@pytest.mark.parametrize("loader", [common.load_cifar100, common.load_cifar10, common.load_mnist])
def test_missing_dataset_is_one_clear_error(tmp_path, loader):
    with pytest.raises(SystemExit) as e:
        loader(tmp_path / "nowhere")
    message = str(e.value)
    assert message.startswith("error: ") and "nowhere" in message and "--data-dir" in message
    assert "\n" not in message


def test_shapes_deterministic_and_levels_consistent():
    a_images, a = common.make_shapes(64, 32, seed=3)
    b_images, b = common.make_shapes(64, 32, seed=3)
    c_images, _ = common.make_shapes(64, 32, seed=4)
    assert torch.equal(a_images, b_images) and not torch.equal(a_images, c_images)
    assert torch.equal(a["fine"], a["shape"] * 36 + a["fill"] * 6 + a["outline"])
    h = common.shapes_hierarchy()
    assert [h.num_classes(l) for l in range(3)] == [2, 12, 72]
    assert torch.equal(h.labels("shape", a["fine"]), a["shape"])
    assert torch.equal(h.labels("shape_fill", a["fine"]), a["shape_fill"])


def test_shapes_images_show_their_fill_colour():
    images, labels = common.make_shapes(600, 32, seed=0)
    colours = torch.tensor(list(common.FILL_COLOURS.values()), dtype=torch.float32)
    # The most common non-background colour of an image must be nearest its fill colour.
    hits = 0
    for img, fill in zip(images[:100].float(), labels["fill"][:100]):
        pixels = img.reshape(3, -1).T
        bright = pixels[pixels.max(1).values > 60]
        dist = torch.cdist(bright, colours)
        nearest = dist.argmin(1)[dist.min(1).values < 30]
        hits += int(torch.bincount(nearest, minlength=6).argmax() == fill)
    assert hits >= 95


def test_shapes_images_show_their_outline_colour():
    images, labels = common.make_shapes(100, 32, seed=0)
    colours = torch.tensor(list(common.FILL_COLOURS.values()) + list(common.OUTLINE_COLOURS.values()))
    hits = 0
    for img, outline in zip(images.float(), labels["outline"]):
        shape = img.max(0).values > 60  # every colour has a channel >= 120; the background stays below 25
        background = ~F.pad(shape, (1, 1, 1, 1))
        # A shape pixel with a background 4-neighbour lies within 1 pixel of the edge, so inside the
        # outline ring (width >= 1.5 pixels), never the fill.
        edge = shape & (background[:-2, 1:-1] | background[2:, 1:-1] | background[1:-1, :-2] | background[1:-1, 2:])
        nearest = torch.cdist(img[:, edge].T, colours.float()).argmin(1)
        hits += int(torch.bincount(nearest, minlength=12).argmax() == 6 + outline)
    assert hits >= 95


def test_stratified_split_balanced_disjoint_deterministic():
    labels = np.repeat(np.arange(5), 20)
    np.random.default_rng(0).shuffle(labels)
    val, train = common.stratified_split(labels, 4, seed=1)
    assert np.bincount(labels[val]).tolist() == [4] * 5
    assert len(np.intersect1d(val, train)) == 0 and len(val) + len(train) == 100
    val2, _ = common.stratified_split(labels, 4, seed=1)
    val3, _ = common.stratified_split(labels, 4, seed=2)
    assert np.array_equal(val, val2) and not np.array_equal(val, val3)
    half_a, half_b = hiernet.test_halves(argparse.Namespace(test_halves="seeded", seed=0), labels)
    assert np.bincount(labels[half_a]).tolist() == [10] * 5 and np.bincount(labels[half_b]).tolist() == [10] * 5
    with pytest.raises(SystemExit):
        common.stratified_split(labels, 21, seed=0)


def make_loader(images, **kw):
    labels = torch.arange(len(images))
    return common.GpuLoader(
        images, labels, 8, device="cpu", mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), channels_last=False, **kw
    )


def test_loader_normalises_and_permutes():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    loader = common.GpuLoader(
        images,
        torch.arange(20),
        8,
        device="cpu",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        train=True,
        seed=0,
        channels_last=True,
    )
    batches = list(loader)
    assert len(batches) == 2  # drop_last for training
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 16
    x, y = batches[0]
    expected = (images[y].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    test_loader = common.GpuLoader(images, torch.arange(20), 8, device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(torch.cat([y for _, y in test_loader]), torch.arange(20))  # all, in order


def test_loader_crop_and_flip_match_a_brute_force_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    pad, fill = 2, 128
    loader = make_loader(images, train=True, crop_pad=pad, fill=fill, flip=True, seed=5)
    flips = 0
    for x, idx in loader:
        for out, i in zip(x, idx):
            padded = F.pad(images[i].float(), (pad,) * 4, value=fill)
            candidates = [
                (padded[:, dy : dy + 8, dx : dx + 8], flip)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                for flip in (False, True)
            ]
            matches = [flip for crop, flip in candidates if torch.equal(out, crop.flip(2) if flip else crop)]
            assert matches, "output is not a translated (and maybe flipped) copy of its image"
            flips += matches[0]
    assert 2 <= flips <= 14  # about half flipped


def test_loader_state_resumes_the_same_batches():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    a = make_loader(images, train=True, crop_pad=1, flip=True, seed=0)
    list(a)
    state = a.state_dict()
    next_a = [x for x, _ in a]
    b = make_loader(images, train=True, crop_pad=1, flip=True, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(next_a, [x for x, _ in b]))


def test_hierarchy_from_json_nested_and_errors(tmp_path):
    fine = ["a", "b", "c", "d"]
    h = common.hierarchy_from_json({"top1": {"m1": ["a", "b"], "m2": ["c"]}, "top2": {"m3": ["d"]}}, fine)
    assert h.n_levels == 3 and h.class_names[0] == ["top1", "top2"] and h.class_names[1] == ["m1", "m2", "m3"]
    assert h.parents[0].tolist() == [0, 0, 0, 1] and h.parents[1].tolist() == [0, 0, 1, 2]
    for bad, word in [
        ({"x": ["a", "b", "c"]}, "'d' is missing"),
        ({"x": ["a", "b", "c", "d", "a"]}, "listed twice"),
        ({"x": ["a", "b", "c", "d", "zebra"]}, "unknown class 'zebra'"),
        ({"x": ["a", "b"], "y": {"z": ["c", "d"]}}, "same depth"),
    ]:
        path = tmp_path / "h.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=word):
            common.load_hierarchy_file(path, fine)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        common.load_hierarchy_file(tmp_path / "broken.json", fine)


def test_hierarchy_from_labels_rejects_inconsistent_parents():
    with pytest.raises(SystemExit, match="several"):
        common.hierarchy_from_labels([0, 0, 1], [[0, 1, 1]], ["coarse", "fine"], [["x", "y"], ["p", "q"]])


def test_folder_loader_png_jpeg_and_cache(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for c, suffix in (("cat", ".png"), ("dog", ".jpg")):
            (tmp_path / part / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
                    tmp_path / part / c / f"{i}{suffix}"
                )
    train, test, h = common.load_folder(tmp_path, image_size=8)
    assert train.images.shape == (6, 3, 8, 8) and h.class_names[-1] == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    caches = list(tmp_path.glob(".cache-8-*.pt"))
    assert len(caches) == 1
    # A new image changes the folder: the cache is rebuilt and holds it.
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(tmp_path / "train" / "cat" / "9.png")
    train2, _, _ = common.load_folder(tmp_path, image_size=8)
    assert len(train2) == 7 and list(tmp_path.glob(".cache-8-*.pt")) != caches
    with pytest.raises(SystemExit, match="not found"):
        common.load_folder(tmp_path / "missing")


@pytest.mark.parametrize(
    "make,published",
    [
        (lambda: common.CifarResNet(3, 10), 0.27e6),
        (lambda: common.CifarResNet(9, 10), 0.85e6),
        (lambda: common.CifarResNet(18, 10), 1.7e6),
        (lambda: merged_resnet.PreActResNetCifar(164, 10), 1.7e6),
        (lambda: merged_resnet.DenseNetBC(100, 12, 10), 0.8e6),
        (lambda: hdl_stack.ResNet18(1000), 11.7e6),
    ],
)
def test_parameter_counts_match_published(make, published):
    # Published counts are rounded to 2 significant digits; DenseNet-BC-100's 0.769M is "0.8M".
    assert abs(common.count_params(make()) - published) / published < 0.04


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: common.CifarResNet(1, 7, elu=True), (2, 3, 32, 32)),
        (lambda: merged_resnet.PreActResNetCifar(11, 7), (2, 3, 32, 32)),
        (lambda: merged_resnet.DenseNetBC(10, 4, 7), (2, 3, 32, 32)),
        (lambda: common.VGG(11, 7), (2, 3, 32, 32)),
        (lambda: hdl_stack.ResNet18(7, stem="imagenet", preact=True), (2, 3, 64, 64)),
        (lambda: hdl_stack.ResNet18(7, stem="cifar"), (2, 3, 32, 32)),
        (lambda: latent_string.LeNetMNIST(7), (2, 1, 28, 28)),
    ],
)
def test_backbones_expose_stem_stages_head(make, shape):
    model = make().eval()
    x = torch.randn(shape)
    h = model.stem(x)
    for stage in model.stages:
        h = stage(h)
    assert torch.allclose(model.head(h), model(x), atol=1e-5)
    assert model(x).shape == (2, 7) and model.features(x).ndim == 2


def test_cifar_resnet_blocks_in_order():
    model = common.CifarResNet(2, 10)
    assert len(model.blocks) == 6 and model.blocks[2] is model.stages[1][0]


@pytest.mark.parametrize("cin,cout,stride", [(16, 32, 2), (3, 8, 2), (8, 8, 2), (16, 16, 1), (4, 10, 1)])
def test_shortcut_a_is_identity_on_old_channels_and_zero_on_new(cin, cout, stride):
    x = torch.randn(2, cin, 7, 7)  # odd size: the subsample must keep pixel 0 and match a padded stride-2 conv
    out = common.ShortcutA(cin, cout, stride)(x)
    assert out.shape[2:] == common.conv3x3(cin, cout, stride)(x).shape[2:]
    lo = (cout - cin) // 2  # the new channels split evenly, the odd one after
    assert torch.equal(out[:, lo : lo + cin], x[:, :, ::stride, ::stride])
    assert not out[:, :lo].any() and not out[:, lo + cin :].any() and out.shape[1] == cout


VGG_LAYERS = {  # Simonyan & Zisserman (2015), Table 1, configurations A and D (convolutions only)
    11: [64, 128, 256, 256, 512, 512, 512, 512],
    16: [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
}


@pytest.mark.parametrize("depth,num_classes", [(16, 10), (16, 100), (11, 10)])
def test_vgg_parameter_count_from_its_layer_list(depth, num_classes):
    widths = [3] + VGG_LAYERS[depth]
    convs = sum(9 * a * b + 2 * b for a, b in itertools.pairwise(widths))  # 3x3 weights, no bias; BN scale and shift
    sizes = [512, 512, 512, num_classes]  # 1x1x512 features, two hidden layers of 512, the classes
    classifier = sum(a * b + b for a, b in itertools.pairwise(sizes))
    assert common.count_params(common.VGG(depth, num_classes)) == convs + classifier


def test_init_weights_he_fan_out_for_convs_bn_one_zero_linear_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 256, 3), nn.BatchNorm2d(256), nn.Linear(100, 10))
    for p in model.parameters():
        nn.init.uniform_(p, 0.5, 1.5)  # so that each value set below is seen to be set
    linear = [p.clone() for p in model[2].parameters()]
    common.init_weights(model)
    w = model[0].weight
    std = (2 / (256 * 9)) ** 0.5  # fan_out = cout * k * k, ReLU gain; fan_in would give twice this
    assert abs(w.std().item() / std - 1) < 0.03 and abs(w.mean().item()) < 0.01 * std
    assert w.abs().max() > 3 * std  # normal, not a uniform of that std (bounded by 1.73 std)
    assert not model[0].bias.any()
    assert torch.equal(model[1].weight, torch.ones(256)) and not model[1].bias.any()
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), linear))


@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 2)])
def test_preact_block_is_bn_relu_conv_twice_plus_shortcut(cin, cout, stride):
    torch.manual_seed(0)
    block = hdl_stack.PreActBlock(cin, cout, stride).double()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)

    def bn_relu(h, bn):
        return F.relu(
            (h - bn.running_mean[:, None, None])
            / (bn.running_var[:, None, None] + bn.eps).sqrt()
            * bn.weight[:, None, None]
            + bn.bias[:, None, None]
        )

    pre = bn_relu(x, block.bn1)
    # Identity mappings (He et al. 2016): the identity shortcut carries x itself; a projection
    # (new width or stride) takes the pre-activated input.
    shortcut = x if stride == 1 and cin == cout else F.conv2d(pre, block.shortcut.weight, stride=stride)
    h = F.conv2d(
        bn_relu(F.conv2d(pre, block.conv1.weight, stride=stride, padding=1), block.bn2), block.conv2.weight, padding=1
    )
    torch.testing.assert_close(block.eval()(x), h + shortcut)


def tiny_run(tmp_path, epochs, name="run", loss_fn=common.cross_entropy_loss, seed_model=0):
    """A miniature script: shapes data, a ResNet with n=1, SGD; returns (history, model)."""
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, epochs=epochs, batch_size=32, lr=0.05)
    out = tmp_path / name
    argv = ["--train-size", "128", "--test-size", "64", "--image-size", "16", "--device", "cpu", "--out-dir", str(out)]
    if (out / "args.json").exists():
        argv = ["--resume", str(out), "--epochs", str(epochs)]
    args = common.parse_args(parser, argv)
    run_dir, device = common.setup(args, "tiny")
    data = common.load_data(args)
    torch.manual_seed(seed_model)
    model = common.CifarResNet(1, data.num_classes)
    opt = common.make_sgd(model.parameters(), args.lr)
    step = common.make_train_step(model, loss_fn, opt, device=device)
    loader = common.GpuLoader(
        data.train.images,
        data.train.labels,
        args.batch_size,
        device=device,
        mean=data.mean,
        std=data.std,
        train=True,
        crop_pad=2,
        flip=True,
        seed=args.seed,
    )
    test = common.GpuLoader(data.test.images, data.test.labels, 64, device=device, mean=data.mean, std=data.std)

    def evaluate(epoch):
        scores, labels = common.predict(model, test, device=device)
        return {"val_acc": common.accuracy(scores, labels)}

    history = common.fit(
        run_dir / "train",
        model,
        opt,
        step,
        loader,
        epochs=args.epochs,
        lr_at=common.piecewise_lr([4], [args.lr, args.lr / 10]),
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
    )
    return history, model, run_dir


def test_resume_continues_exactly(tmp_path):
    straight, model_a, _ = tiny_run(tmp_path, 2, "straight")
    tiny_run(tmp_path, 1, "split")
    resumed, model_b, run_dir = tiny_run(tmp_path, 2, "split", seed_model=123)  # other init: must be overwritten
    keys = ["epoch", "step", "lr", "loss", "train_acc", "val_acc"]
    assert [{k: r[k] for k in keys} for r in straight] == [{k: r[k] for k in keys} for r in resumed]
    for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(p, q)
    assert len(common.read_jsonl(run_dir / "metrics.jsonl")) == 2
    assert json.loads((run_dir / "args.json").read_text())["epochs"] == 1  # the original args are kept


def test_checkpoint_every_n_epochs_resumes_from_the_last_one_exactly(tmp_path, monkeypatch):
    """--checkpoint-every 2 over 5 epochs: checkpoints after epochs 2, 4 and 5, each with the log lines of
    its epochs. A run stopped in epoch 4 goes on from epoch 2 and ends as the straight run does, each epoch
    logged once."""
    monkeypatch.setitem(common._RUN, "args", argparse.Namespace(checkpoint_every=2))
    saved_epochs, real_save = [], common.save_checkpoint
    monkeypatch.setattr(
        common, "save_checkpoint", lambda path, state: saved_epochs.append(state["epoch"]) or real_save(path, state)
    )
    g = torch.Generator().manual_seed(0)
    images, labels = (
        torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g),
        torch.randint(0, 4, (64,), generator=g),
    )

    def run(run_dir, init_seed, stop_at=None):
        torch.manual_seed(init_seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        opt = common.make_sgd(model.parameters(), 0.1)
        step = common.make_train_step(model, common.cross_entropy_loss, opt, device=torch.device("cpu"))
        loader = common.GpuLoader(
            images, labels, 16, device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3, train=True, flip=True
        )

        def on_epoch_end(epoch, record):
            if epoch == stop_at:
                raise KeyboardInterrupt

        common.seed_everything(0)
        history = common.fit(
            run_dir,
            model,
            opt,
            step,
            loader,
            epochs=5,
            lr_at=lambda s: 0.1,
            log_path=run_dir / "log.jsonl",
            on_epoch_end=on_epoch_end,
        )
        return history, model

    straight, model_a = run(tmp_path / "straight", 0)
    assert saved_epochs == [2, 4, 5]
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "split", 0, stop_at=4)
    assert stop.value.code == 130 and saved_epochs[3:] == [2]
    assert [r["epoch"] for r in common.read_jsonl(tmp_path / "split" / "log.jsonl")] == [1, 2]  # not ahead
    resumed, model_b = run(tmp_path / "split", 123)  # another init: the checkpoint's weights replace it
    assert saved_epochs[4:] == [4, 5]
    keys = ["epoch", "step", "loss", "train_acc"]
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in straight]
    assert [r["loss"] for r in common.read_jsonl(tmp_path / "split" / "log.jsonl")] == [r["loss"] for r in straight]
    for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(p, q)


def test_existing_run_dir_needs_resume_or_force(tmp_path):
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, epochs=1, batch_size=8, lr=0.1)
    argv = ["--out-dir", str(tmp_path / "r"), "--device", "cpu"]
    run_dir, _ = common.setup(common.parse_args(parser, argv), "x")
    common.save_checkpoint(run_dir / "train" / "checkpoint.pt", {"epoch": 1})  # a run that trained
    with pytest.raises(SystemExit, match="--resume"):
        common.setup(common.parse_args(parser, argv), "x")
    run_dir, _ = common.setup(common.parse_args(parser, argv + ["--force"]), "x")
    assert (run_dir / "args.json").exists()
    with pytest.raises(SystemExit, match="not a run directory"):
        common.parse_args(parser, ["--resume", str(tmp_path / "nothing")])


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    tiny_run(tmp_path, 1, "nan")

    def nan_loss(model, x, y):
        return model(x).sum() * float("nan")

    with pytest.raises(SystemExit, match="non-finite loss in epoch 2"):
        tiny_run(tmp_path, 2, "nan", loss_fn=nan_loss)
    ckpt = common.load_checkpoint(tmp_path / "nan" / "train" / "checkpoint.pt")
    assert ckpt["epoch"] == 1


def test_shapes_small_resnet_learns_every_level_on_cpu():
    data = common.Data("shapes", *common.load_shapes(2000, 500, 32, seed=0), mean=(0.1,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    model = common.CifarResNet(1, 72)
    opt = common.make_sgd(model.parameters(), 0.05, weight_decay=5e-4)
    step = common.make_train_step(model, common.cross_entropy_loss, opt, device="cpu")
    loader = common.GpuLoader(
        data.train.images,
        data.train.labels,
        64,
        device="cpu",
        mean=data.mean,
        std=data.std,
        train=True,
        flip=True,
        seed=0,
    )
    for _ in range(3):
        common.train_epoch(step, loader, opt, lambda s: 0.05, 0)
    test = common.GpuLoader(data.test.images, data.test.labels, 250, device="cpu", mean=data.mean, std=data.std)
    scores, labels = common.predict(model.eval(), test, device="cpu")
    acc = common.level_accuracies(scores, labels, data.hierarchy)
    chance = {"shape": 50, "shape_fill": 100 / 12, "fine": 100 / 72}
    for level, value in acc.items():
        assert value > 1.15 * chance[level] + 3, (level, acc)


def test_metrics_against_direct_computation():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 0, 1, 2])
    assert common.accuracy(scores, labels) == 50.0
    assert (common.ranked_classes(scores, 2) == labels[:, None]).any(1).tolist() == [True, True, True, False]
    h = common.Hierarchy(["coarse", "fine"], [["x", "y"], ["a", "b", "c"]], [np.array([0, 0, 1]), np.arange(3)])
    acc = common.level_accuracies(torch.log(scores + 1e-9), labels, h)
    # Coarse probabilities: row sums of a+b vs c -> x, x, x(0.5 vs 0.5 -> first), x; true x, x, x, y.
    assert acc["fine"] == 50.0 and acc["coarse"] == 75.0


def test_piecewise_lr_and_plateau():
    lr_at = common.piecewise_lr([2000, 32000, 48000], [0.01, 0.1, 0.01, 0.001])
    assert [lr_at(s) for s in (0, 1999, 2000, 31999, 32000, 48000, 70000)] == [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001]
    plateau = coarse_outer_product.ReduceOnPlateau(0.01, factor=0.3, patience=2)
    for loss in (1.0, 0.9, 0.95, 0.95):
        plateau.update(loss)
    assert plateau.lr == pytest.approx(0.003)


def reference_adam(param, grads, lr, weight_decay, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam with L2 weight decay (Kingma & Ba, Algorithm 1, the decay added to the gradient),
    step by step in float64 on a list of gradients: the parameter after each step."""
    p, m, v, out = param.double().clone(), 0.0, 0.0, []
    for t, g in enumerate(grads, 1):
        g = g.double() + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        out.append(p.clone())
    return out


def test_adam_on_cuda_is_fused_and_graph_safe_with_the_same_update_as_on_the_cpu():
    """make_adam's CUDA form (fused, capturable) and its CPU form take the reference's steps.
    The fused kernel also runs on the CPU, so its update rule is checked here; capturable (the
    step counter kept on the device) only matters inside a CUDA graph, and is set aside."""
    torch.manual_seed(0)
    grads = [torch.randn(7) for _ in range(25)]
    start = torch.randn(7)
    want = reference_adam(start, grads, lr=0.01, weight_decay=0.1)
    cuda_form = common.make_adam([torch.nn.Parameter(start.clone())], 0.01, weight_decay=0.1, device="cuda")
    group = cuda_form.param_groups[0]
    assert group["fused"] is True and group["capturable"] is True
    group["capturable"] = False  # CPU parameters: the counter stays on the host
    for optimizer in (cuda_form, common.make_adam([torch.nn.Parameter(start.clone())], 0.01, weight_decay=0.1)):
        param = optimizer.param_groups[0]["params"][0]
        for g, expected in zip(grads, want):
            param.grad = g.clone()
            optimizer.step()
            torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=1e-5)


def test_checkpoint_writer_saves_the_state_as_it_was_and_raises_its_errors(tmp_path):
    weights = torch.zeros(1000)
    writer = common.CheckpointWriter()
    writer.submit(tmp_path / "ckpt.pt", {"w": weights, "epoch": 1}, tmp_path / "log.jsonl", [{"epoch": 1}])
    weights.add_(1.0)  # the next epoch changes the tensors in place while the write may be in flight
    writer.wait()
    saved = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert saved["epoch"] == 1 and torch.equal(saved["w"], torch.zeros(1000))
    assert common.read_jsonl(tmp_path / "log.jsonl") == [{"epoch": 1}]
    (tmp_path / "blocked").write_text("a file where a folder should be")
    writer.submit(tmp_path / "blocked" / "ckpt.pt", {"epoch": 2})
    with pytest.raises(SystemExit, match="cannot write"):
        writer.wait()
    writer.wait()  # the error is raised once


def test_a_ctrl_c_during_the_wait_for_a_checkpoint_write_still_waits_for_it_after(tmp_path):
    """Ctrl-C while fit waits for the write in flight: the interrupt handler's own wait must still block until
    that write has ended. (On CPython 3.11 a Thread.join cut short by KeyboardInterrupt can mark the running
    thread stopped, so a second join returns at once and the process exits mid-write, leaving a temp file.)
    In a subprocess, so that the SIGINT cannot reach pytest."""
    script = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import common
release, finished = threading.Event(), threading.Event()
def slow_save(path, state):
    release.wait()
    time.sleep(0.2)
    finished.set()
common.save_checkpoint = slow_save  # the write in flight: held until released
writer = common.CheckpointWriter()
writer.submit("unused.pt", {"epoch": 1})
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    writer.wait()
    print("not interrupted")
except KeyboardInterrupt:
    threading.Timer(0.3, release.set).start()
    writer.wait()  # as fit's interrupt handler does
    print("finished" if finished.is_set() else "returned while the write was in flight")
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(common.__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "finished", done.stdout + done.stderr
