"""Every paper recipe, as `gendd-pipe config show` resolves it, against the official GenDD scripts setting by setting.

The table gives, for each setting, the value the official run uses and where it
is set: a line of a shell script under the official repository's ``sh/``
folders, or an argparse default (``--name``) or an expression of its Python
files. Files, all of jiequancui/Generative-Distribution-Distillation:

- R34R18: GenDD_imagenet/sh/imagenet_train_res34res18_gendd.sh
- R50MV: GenDD_imagenet/sh/imagenet_train_res50mv_gendd.sh
- EVAL: GenDD_imagenet/sh/imagenet_eval_res50mv_gendd.sh
- CC3M: GenDD_imagenet/sh/cc3m_train_res34res18_unsupervised_gendd.sh
- A1: ResNet8/sh/train_beitlr50_stage24_cos_A1_with_pretrain_crop06_600.sh (the BEiT-L A1 run; its released
  GenDD_imagenet/sh script sets --weight-decay 1e-2 in both stages)
- PRE / SUP / DIFF: GenDD_imagenet/main_gendd_pretrain.py, main_supervised_gendd.py, models/diff_model.py
- CIFAR: GenDD_cifar/sh/train_res32x4_res8x4_gendd.sh; CPRE / CSUP: GenDD_cifar/train_student_pretrain.py,
  train_student_gendd.py
"""

import pytest
import yaml
from typer.testing import CliRunner

from gendd_pipe.cli import app
from gendd_pipe.distill.methods import get_method
from gendd_pipe.recipe import load_params, section

R34, R50, BEIT, CC3M, CIFAR = ("pipelines/imagenet-r34-r18/params.yaml", "pipelines/imagenet-r50-mobilenet/params.yaml",
                               "pipelines/imagenet-beitl-r50/params.yaml",
                               "pipelines/cc3m-unsupervised-r34-r18/params.yaml", "pipelines/cifar100-r50-r18/params.yaml")
G = "distill.runs.gendd."

# the ImageNet GenDD settings every supervised ImageNet recipe shares: (key, official value, where)
IMAGENET_GENDD = [
    (G + "min_lr", 1e-6, "PRE, SUP: --min_lr default 1e-6"),
    (G + "schedule", "cosine", "SUP: --cos, adjust_learning_rate_cos; PRE: adjust_learning_rate_cos"),
    (G + "beta2", [0.96, 0.999], "SUP: --adam_beta_min 0.96, --adam_beta_max 0.999 defaults, beta2_schedule_cos"),
    (G + "loader.batch_size", 512, "R34R18:23,43; R50MV:22,41; A1:56; CC3M:24 (-b 512, the global batch)"),
    (G + "loader.eval_view", False, "SUP: train_dataset trains on RandomResizedCrop alone, never the center crop"),
    (G + "gendd.head.width", 1024, "SUP: --diffloss_w default 1024"),
    (G + "gendd.head.depth", 3, "DIFF: DiffModel(diffloss_d=3)"),
    (G + "gendd.head.token_dim", 64, "SUP: --token_dim default 64"),
    (G + "gendd.head.diffusion_batch_mul", 10, "SUP: --diffusion_batch_mul default 10"),
    (G + "gendd.head.cond_drop", 0.2, "SUP: --cond_drop_prob default 0.2"),
    (G + "gendd.head.train_steps", 1000, "diffloss.py: create_diffusion(diffusion_steps=1000)"),
    (G + "gendd.head_weight_decay", 0.0, "SUP: --diff_weight_decay default 0 (param_groups_setup)"),
    (G + "gendd.centers", "raw", "DIFF: cls_centers = classifier.weight"),
    (G + "student.input_size", 224, "SUP: RandomResizedCrop(224)"),
    (G + "student.eval.resize", 256, "SUP: val_dataset Resize(256) + CenterCrop(224)"),
    (G + "student.eval.interpolation", "bilinear", "SUP: torchvision Resize's default interpolation"),
    (G + "gendd.stage1_scale", [0.08, 1.0], "PRE: regular_transform RandomResizedCrop(224), scale (0.08, 1)"),
    (G + "gendd.stage1_lr", None, "PRE and SUP run at the same --lr (None: the run's lr)"),
    (G + "gendd.stage1_min_lr", None, "PRE: --min_lr default 1e-6 (None: the run's min_lr)"),
    ("evaluate.checkpoint", "both", "EVAL:24 --resume .../model_best.pth.tar (and last beside it)"),
    ("evaluate.predict.gendd.samples", 5, "EVAL:20 --num_sampling 5"),
    ("evaluate.predict.gendd.sampling_steps", 64, "DIFF: num_sampling_steps='64'"),
    ("evaluate.predict.gendd.cfg", 2.0, "DIFF: forward_test_stage2, diffloss.sample(..., cfg=2.0)"),
    ("evaluate.predict.gendd.temperature", 1.0, "DIFF: forward_test_stage2, temperature=1.0"),
    ("evaluate.predict.gendd.sampler", "ddpm", "diffloss.py: gen_diffusion.p_sample_loop (ancestral)"),
    ("extract.views.scale", [0.6, 1.0], "SUP: --crop_scale default 0.6, RandomResizedCrop(224, scale=(0.6, 1))"),
    ("extract.views.hflip", 0.5, "SUP: RandomHorizontalFlip()"),
]

OFFICIAL = {
    R34: IMAGENET_GENDD + [
        (G + "epochs", 120, "R34R18:24 pretrain --epochs 20 + R34R18:40 --epochs 100"),
        (G + "gendd.stage1_epochs", 20, "R34R18:24 main_gendd_pretrain.py --epochs 20"),
        (G + "lr", 2e-3, "R34R18:19,35 --lr 2e-3"),
        (G + "weight_decay", 2e-2, "R34R18:20,37 --weight-decay 2e-2"),
        (G + "warmup_epochs", 10, "R34R18:41 --warmup_epochs 10"),
        (G + "gendd.smooth", 0.9, "R34R18:39 --smooth 0.9"),
        (G + "gendd.mixup", 1.0, "SUP: --beta default 1.0"),
        (G + "student.name", "resnet18", "R34R18:29 -a resnet18"),
        (G + "student.model_args.zero_init_last", False, "models/resnet.py: torchvision's ResNet, zero_init_residual False"),
        ("extract.teacher.name", "resnet34.tv_in1k", "R34R18:38 --teacher_arch resnet34 (torchvision weights)"),
        ("distill.runs.kd.epochs", 100, "R34R18:40: the baselines take stage 2's schedule"),
        ("distill.runs.kd.warmup_epochs", 10, "R34R18:41"),
    ],
    R50: IMAGENET_GENDD + [
        (G + "epochs", 120, "R50MV:23 pretrain --epochs 20 + R50MV:39 --epochs 100"),
        (G + "gendd.stage1_epochs", 20, "R50MV:23"),
        (G + "lr", 2e-3, "R50MV:18,34 --lr 2e-3"),
        (G + "weight_decay", 2e-2, "R50MV:19,36 --weight-decay 2e-2"),
        (G + "warmup_epochs", 20, "SUP: --warmup_epochs default 20 (R50MV sets none)"),
        (G + "gendd.smooth", 0.9, "R50MV:38 --smooth 0.9"),
        (G + "student.name", "mobilenetv1_100", "R50MV:28 -a MobileNetV1"),
        (G + "student.model_args.act_layer", "relu", "models/mobilenetv1.py: nn.ReLU"),
        ("extract.teacher.name", "resnet50.tv_in1k", "R50MV:37 --teacher_arch resnet50 (torchvision weights)"),
        ("distill.runs.kd.epochs", 100, "R50MV:39"),
        ("distill.runs.kd.warmup_epochs", 20, "SUP: --warmup_epochs default 20"),
    ],
    BEIT: [row for row in IMAGENET_GENDD if "gendd.mixup" not in row[0]] + [
        (G + "epochs", 620, "A1:28 pretrain --epochs 20 + A1:49 --epochs 600"),
        (G + "gendd.stage1_epochs", 20, "A1:28"),
        (G + "lr", 2e-3, "A1:18,39 --lr 2e-3"),
        (G + "weight_decay", 1e-2, "the released A1 script: --weight-decay 1e-2 in both stages"),
        (G + "warmup_epochs", 20, "A1:48 --warmup_epochs 20"),
        (G + "gendd.smooth", 0.9, "A1:43 --smooth 0.9"),
        (G + "gendd.mixup", 0.0, "A1:44 --beta 0.0"),
        (G + "loader.label_smoothing", 0.1, "A1:52 --smoothing 0.1"),
        (G + "student.name", "resnet50", "A1:33 -a resnet50"),
        (G + "student.model_args.zero_init_last", False, "models/resnet.py: torchvision's ResNet"),
        ("extract.augment.color_jitter", 0.4, "SUP: rand_transform ColorJitter(0.4, 0.4, 0.4, 0.0) (--aug_type rand)"),
        ("extract.augment.randaugment", "rand-n2-m7-mstd0.5", "A1:53 --aug_type rand; SUP: --rand_n 2, --rand_m 7"),
        ("extract.augment.mixup", 0.2, "A1:50 --mixup 0.2"),
        ("extract.augment.cutmix", 1.0, "A1:51 --cutmix 1.0"),
        ("extract.augment.mix_prob", 1.0, "SUP: --mixup_prob default 1.0"),
        ("extract.augment.switch_prob", 0.5, "SUP: --mixup_switch_prob default 0.5"),
        ("distill.runs.kd.epochs", 600, "A1:49"),
    ],
    CC3M: [row for row in IMAGENET_GENDD if "stage1" not in row[0] and "schedule" not in row[0]] + [
        (G + "schedule", "step", "CC3M has no --cos: adjust_learning_rate (SUP's), epoch // 30 steps of x0.1"),
        (G + "decay_epochs", [30, 60, 90], "SUP: adjust_learning_rate, lr * 0.1 ** (epoch // 30)"),
        (G + "decay_rate", 0.1, "SUP: adjust_learning_rate"),
        (G + "epochs", 100, "CC3M:22 --epochs 100"),
        (G + "unsupervised", True, "CC3M:12 main_unsupervised_gendd.py"),
        (G + "gendd.stage1_epochs", 0, "CC3M: no pretrain"),
        (G + "lr", 2e-3, "CC3M:18 --lr 2e-3"),
        (G + "weight_decay", 2e-2, "CC3M:19 --weight-decay 2e-2"),
        (G + "warmup_epochs", 20, "main_unsupervised_gendd.py: --warmup_epochs default 20 (CC3M sets none)"),
        (G + "gendd.smooth", 0.0, "CC3M:21 --smooth 0.0"),
        (G + "gendd.mixup", 1.0, "--beta default 1.0"),
        (G + "student.name", "resnet18", "CC3M:12 -a resnet18"),
        ("extract.teacher.name", "resnet34.tv_in1k", "CC3M:20 --teacher_arch resnet34"),
    ],
    CIFAR: [
        (G + "epochs", 290, "CIFAR:12 pretrain --epochs 50 + CIFAR:14 --epochs 240"),
        (G + "gendd.stage1_epochs", 50, "CIFAR:12 train_student_pretrain.py --epochs 50"),
        (G + "gendd.stage1_lr", 3e-3, "CIFAR:12 --learning_rate 3e-3"),
        (G + "gendd.stage1_min_lr", 0.0, "CPRE: --min_learning_rate default 0.0, adjust_learning_rate_cos"),
        (G + "lr", 1e-3, "CIFAR:14 --learning_rate 1e-3"),
        (G + "weight_decay", 5e-2, "CIFAR:12,14 --weight_decay 5e-2"),
        (G + "loader.batch_size", 64, "CIFAR:12,14 --batch_size 64"),
        (G + "warmup_epochs", 50, "CIFAR:14 --warmup_epochs 50"),
        (G + "schedule", "step", "CIFAR:14 has no --cos: CSUP adjust_learning_rate"),
        (G + "decay_epochs", [150, 180, 210], "CSUP: --lr_decay_epochs default '150,180,210'"),
        (G + "decay_rate", 0.1, "CSUP: --lr_decay_rate default 0.1"),
        (G + "beta2", [0.95, 0.999], "CSUP: --adam_beta_min default 0.95, --adam_beta_max 0.999"),
        (G + "gendd.smooth", 0.7, "CIFAR:14 --smooth 0.7"),
        (G + "gendd.head.diffusion_batch_mul", 30, "CIFAR:14 --diffusion_batch_mul 30"),
        (G + "gendd.head.width", 1024, "CSUP: --diffloss_w default 1024"),
        (G + "gendd.head.token_dim", 64, "CSUP: --token_dim default 64"),
        (G + "gendd.head.cond_drop", 0.2, "CSUP: --cond_drop_prob default 0.2"),
        (G + "gendd.head_weight_decay", 0.0, "CSUP: --diff_weight_decay default 0"),
        (G + "gendd.mixup", 1.0, "CSUP: --beta default 1.0"),
        ("distill.runs.kd.epochs", 240, "CIFAR:14: the baselines take stage 2's schedule"),
    ],
}


def _shown(recipe: str, run: str = "gendd") -> dict:
    result = CliRunner().invoke(app, ["config", "show", "--config", recipe, "--run", run])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def _at(tree: dict, key: str):
    """The setting at ``key``; ``evaluate.predict.gendd.K``: evaluate's override of K, else the run's own."""
    if key.startswith("evaluate.predict.gendd."):
        name = key.rsplit(".", 1)[1]
        override = tree["evaluate"]["predict"].get("gendd", {})
        return override[name] if name in override else tree["distill"]["runs"]["gendd"]["gendd"]["predict"][name]
    for part in key.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("recipe", list(OFFICIAL), ids=lambda p: p.split("/")[1])
def test_every_paper_recipe_resolves_to_the_official_settings(recipe):
    shown = {"gendd": _shown(recipe)}
    wrong = []
    for key, official, where in OFFICIAL[recipe]:
        run = key.split(".")[2] if key.startswith("distill.runs.") else "gendd"
        if run not in shown:
            shown[run] = _shown(recipe, run)
        value = _at(shown[run], key)
        same = value == pytest.approx(official) if isinstance(official, float) else value == official
        if not same:
            wrong.append(f"{key}: {value!r}, official {official!r} ({where})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("recipe", [R34, R50, BEIT, CIFAR], ids=lambda p: p.split("/")[1])
def test_stage1_is_the_official_pretrain_and_stage2_a_fresh_schedule(recipe):
    """PRE / CPRE: AdamW(betas=(0.9, 0.999)), a cosine from lr without warmup (--warmup_epochs default 0); stage 2
    takes the run's warmup, schedule and beta2 ramp over its own epochs."""
    cfg = section(load_params(recipe), "distill", recipe).run("gendd")
    stage1, stage2 = get_method("gendd").phases(cfg)
    assert (stage1.name, stage1.warmup_epochs, stage1.beta2, stage1.schedule) == ("stage1", 0, (0.999, 0.999), "cosine")
    assert stage1.epochs == cfg.options.stage1_epochs and stage1.fresh_scale == tuple(cfg.options.stage1_scale)
    assert stage1.lr == (cfg.options.stage1_lr or cfg.lr) and not stage1.selects_best
    assert (stage2.epochs, stage2.warmup_epochs, stage2.beta2) == (cfg.epochs - stage1.epochs, cfg.warmup_epochs,
                                                                    tuple(cfg.beta2))
