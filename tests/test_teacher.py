import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from gendd_pipe import GenddError
from gendd_pipe.models.teacher import TeacherConfig, create_teacher, file_sha256


def test_none_weights_are_seeded_so_every_worker_builds_the_same_teacher():
    a = create_teacher(TeacherConfig("resnet18", "none", input_size=32, seed=1))
    b = create_teacher(TeacherConfig("resnet18", "none", input_size=32, seed=1))
    c = create_teacher(TeacherConfig("resnet18", "none", input_size=32, seed=2))
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert a.data_config["input_size"] == (3, 32, 32)
    assert a.num_features == 512 and a.head()[0].shape == (1000, 512)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_from_a_file_with_its_classifier_size(tmp_path, suffix):
    model = timm.create_model("resnet18", num_classes=10)
    path = str(tmp_path / f"teacher{suffix}")
    if suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        safetensors.torch.save_file(model.state_dict(), path)
    teacher = create_teacher(TeacherConfig("resnet18", path, input_size=32))
    assert teacher.num_classes == 10 and teacher.weights_sha256 == file_sha256(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    np.testing.assert_allclose(teacher(x)[1].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_bundled_weights_only_fit_their_architecture():
    with pytest.raises(GenddError, match="load into tf_efficientnet_lite0, not resnet18"):
        create_teacher(TeacherConfig("resnet18", "bundled:efficientnet-lite0"))


def test_unknown_teacher_name_is_a_one_line_error():
    with pytest.raises(GenddError, match=r"unknown teacher model 'resnet_does_not_exist'"):
        create_teacher(TeacherConfig("resnet_does_not_exist", "none"))


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    path = str(tmp_path / "r34.pth")
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(GenddError, match=r"r34.pth: weights do not fit resnet18") as info:
        create_teacher(TeacherConfig("resnet18", path))
    assert "\n" not in str(info.value)


def test_missing_weights_file_and_garbage_file(tmp_path):
    with pytest.raises(GenddError, match="nope.pth: no such weights file"):
        create_teacher(TeacherConfig("resnet18", str(tmp_path / "nope.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(GenddError, match="junk.pth: cannot read weights"):
        create_teacher(TeacherConfig("resnet18", str(junk)))
