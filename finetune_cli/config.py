"""Typed configuration schema.

Every run is validated against these dataclasses (registered in Hydra's ConfigStore as the base
of ``conf/config.yaml``): a misspelled key, a wrong type or an unknown choice fails during
composition, before any output folder exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore

RANDOM_NAMES = ("null", "none", "random")  # model.weights values that mean random init

class StrategyName(str, Enum):
    linear_probe = "linear_probe"  # the head only
    freeze_early = "freeze_early"  # all but the first `freeze_groups` groups
    partial = "partial"  # the last `train_groups` groups and the head
    full = "full"  # everything
    progressive = "progressive"  # head first, then one more group at a time, top down
    staged = "staged"  # a list of stages, each with its own trainable groups and LR multiplier
    auto = "auto"  # chosen from the number of training images per class
    bitfit = "bitfit"  # the head and every bias (BitFit: Ben Zaken et al., 2022)
    norm = "norm"  # the head and every normalization layer's scale and shift


class Trigger(str, Enum):
    epochs = "epochs"  # unfreeze every `strategy.every` epochs
    plateau = "plateau"  # unfreeze when the monitored metric stops improving


class RegularizerName(str, Enum):
    none = "none"
    l2sp = "l2sp"  # pull weights towards their pretrained values
    ewc = "ewc"  # the same, weighted by a diagonal Fisher estimate


class BNMode(str, Enum):
    frozen_eval = "frozen_eval"  # BatchNorm in frozen groups runs in eval mode
    train = "train"  # every BatchNorm updates its statistics (frozen groups' weights stay as they are)
    freeze_all = "freeze_all"  # every BatchNorm in eval mode, even in trainable groups


class LoraTargets(str, Enum):
    all = "all"  # the family's LoRA layers in every group below the head
    last = "last"  # those in the upper half of the groups below the head (the last stages)


class LoraSave(str, Enum):
    full = "full"  # checkpoints hold every weight: they stand alone
    adapter = "adapter"  # only what trains (LoRA matrices, head) and the buffers; the rest is model.weights


class HeadType(str, Enum):
    linear = "linear"
    mlp = "mlp"


class DataSource(str, Enum):
    imagefolder = "imagefolder"
    synthetic = "synthetic"
    csv = "csv"  # a CSV file of path,label[,split] rows


class AugmentName(str, Enum):
    none = "none"  # the deterministic eval transform (mixing still applies if set)
    basic = "basic"  # random resized crop + flip, plus whichever extras are set
    strong = "strong"  # the same builder; its preset turns the extras on
    randaugment = "randaugment"
    trivialaugment = "trivialaugment"
    autoaugment = "autoaugment"


class AutoAugmentPolicy(str, Enum):
    imagenet = "imagenet"
    cifar10 = "cifar10"
    svhn = "svhn"


class LoggerName(str, Enum):
    none = "none"  # metrics.csv and summary.json only (always written)
    tensorboard = "tensorboard"  # also TensorBoard event files in the run folder
    mlflow = "mlflow"  # also an MLflow run: the config, every epoch's metrics, the run's files


class PreviewMode(str, Enum):
    off = "off"
    augment = "augment"  # write a grid of augmented training images and stop


class OptimizerName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class LRScaling(str, Enum):
    none = "none"  # the LRs as given, whatever the number of processes
    linear = "linear"  # LRs times the number of processes (the global batch grows with it)


class ScheduleName(str, Enum):
    constant = "constant"
    step = "step"
    cosine = "cosine"
    cosine_restarts = "cosine_restarts"
    onecycle = "onecycle"
    plateau = "plateau"
    stlr = "stlr"  # ULMFiT's slanted triangular LR


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Amp(str, Enum):
    auto = "auto"  # bf16 (or fp16 where bf16 is unsupported) on CUDA, off on CPU
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class BadImage(str, Enum):
    error = "error"  # stop before training, listing every bad file
    skip = "skip"  # leave them out, listing them in the console and RUN/skipped_images.txt


class AdaptName(str, Enum):
    none = "none"
    dann = "dann"  # domain-adversarial: gradient reversal + domain classifier (Ganin et al., 2016)
    mmd = "mmd"  # multi-kernel maximum mean discrepancy between the domains' features (Long et al., 2015)


class SyntheticStyle(str, Enum):
    plain = "plain"
    shifted = "shifted"  # photo-like backgrounds, blended by difference, colour shift, noise (like MNIST-M)


class Monitor(str, Enum):
    val_acc = "val_acc"
    val_loss = "val_loss"
    val_balanced_acc = "val_balanced_acc"  # the mean of the classes' recalls: each class counts the same
    val_macro_f1 = "val_macro_f1"  # the mean of the classes' F1 scores
    # the same, for the weights' moving average (trainer.ema): best.pt then serves the average
    ema_val_acc = "ema_val_acc"
    ema_val_loss = "ema_val_loss"
    ema_val_balanced_acc = "ema_val_balanced_acc"
    ema_val_macro_f1 = "ema_val_macro_f1"

    @property
    def maximize(self) -> bool:
        return not self.value.endswith("loss")

    @property
    def of_ema(self) -> bool:
        return self.value.startswith("ema_")


class SamplerName(str, Enum):
    shuffle = "shuffle"  # every training image once per epoch, in a new order
    balanced = "balanced"  # images drawn with replacement, each class equally likely (rare classes repeat)


class ClassWeights(str, Enum):
    none = "none"
    auto = "auto"  # each class's loss weighted by n / (classes x its count): inverse frequency, mean 1
    sqrt = "sqrt"  # by the square root of that: a milder correction


@dataclass
class ModelConfig:
    name: str = "resnet18"
    # DEFAULT, a torchvision weights name, a local file, "synthetic", or null (random init)
    weights: Optional[str] = "DEFAULT"
    head: HeadType = HeadType.linear
    head_hidden: int = 512
    head_dropout: float = 0.0
    aux_logits: bool = True  # keep GoogLeNet / InceptionV3 auxiliary classifiers in training
    aux_weight: float = 0.3  # weight of each auxiliary loss


@dataclass
class SyntheticConfig:
    classes: int = 10
    train_per_class: int = 60
    val_per_class: int = 20
    image_size: int = 32
    seed: int = 0
    # a target domain for adaptation: the same classes in another style (its val/ labelled for
    # evaluation only); null = none
    target_style: Optional[SyntheticStyle] = None


@dataclass
class DataConfig:
    source: DataSource = DataSource.imagefolder
    # imagefolder: the folder holding train/<class>/*; csv: where the CSV's relative paths start
    # (default: the CSV file's folder)
    root: Optional[str] = None
    csv: Optional[str] = None  # data=csv: the file of path,label[,split] rows
    image_size: Optional[int] = None  # default: the weights' own crop size
    batch_size: int = 32
    num_workers: str = "auto"  # "auto" or a number
    val_fraction: float = 0.2
    check_images: bool = True  # decode every image once before training (results cached)
    on_bad_image: BadImage = BadImage.error
    max_image_pixels: int = 89_478_485  # larger images count as decompression bombs (Pillow's limit)
    # auto: when only the head trains, compute the frozen network's output once (validation
    # always; training too when its transform is deterministic); true: demand it; false: never
    cache_features: str = "auto"
    reduced_decode: bool = True  # decode large JPEGs at a reduced scale still >= the size needed
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sampler: SamplerName = SamplerName.shuffle  # balanced: for imbalanced classes
    # an unlabelled target domain: DIR/train/ (or DIR itself) holds its images, in class folders
    # or not (labels are never used in training); DIR/val/<class>/* is evaluated each epoch
    target_root: Optional[str] = None


@dataclass
class StageConfig:
    epochs: int = 1
    train_groups: int = -1  # groups below the head that train in this stage; -1 = all
    lr_mult: float = 1.0  # multiplies every group's LR during this stage
    patience: Optional[int] = None  # early stopping within the stage (best weights restored)


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.linear_probe
    freeze_groups: int = 1  # freeze_early: how many groups, from the input side, stay frozen
    train_groups: int = 2  # partial: how many groups below the head train
    lr_scale: float = 1.0  # multiplies optimizer.lr for this strategy (full fine-tuning: low LR)
    bn: BNMode = BNMode.train  # frozen groups' statistics follow the target data; linear_probe: frozen_eval
    # discriminative LRs (any strategy): optimizer.lr x lr_scale is the head's LR; each group
    # below gets the LR of the group above divided by lr_decay; or an explicit list
    lr_decay: float = 1.0
    group_lrs: Optional[List[float]] = None  # one LR per group, stem first, head last
    # progressive
    every: int = 1  # trigger=epochs: unfreeze one more group every N epochs
    trigger: Trigger = Trigger.epochs
    plateau_patience: int = 1  # trigger=plateau: epochs without improvement before unfreezing
    until: int = -1  # stop once this many groups below the head train; -1 = all
    rewarmup_epochs: float = 0.0  # after each unfreeze, ramp the LR up again over N epochs
    # a schedule the strategy needs (ulmfit: stlr); it replaces schedule.name, null = schedule.name
    schedule: Optional[ScheduleName] = None
    # staged
    stages: List[StageConfig] = field(default_factory=list)
    # auto: images per class below `auto_small` -> linear probe (0: never); below `auto_large` ->
    # freeze the early half of the groups; else full fine-tuning with discriminative LRs
    auto_small: int = 0
    auto_large: int = 50
    auto_lr_decay: float = 1.5
    # LoRA (strategy=lora; or lora=true with any strategy that trains groups below the head): a
    # training group below the head trains only low-rank matrices (peft) beside the family's chosen
    # layers, whose own weights stay frozen; the head trains fully
    lora: bool = False
    lora_rank: int = 16  # r
    lora_alpha: float = 32.0  # the update B @ A is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    lora_targets: LoraTargets = LoraTargets.all
    lora_save: LoraSave = LoraSave.full


@dataclass
class RegularizerConfig:
    name: RegularizerName = RegularizerName.none
    strength: float = 0.01  # alpha (l2sp) or lambda (ewc)
    fisher_root: Optional[str] = None  # ewc: images of the source task (DIR/<class>/*); default: target train data
    fisher_samples: int = 256  # ewc: images used for the Fisher estimate


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scale_lr: LRScaling = LRScaling.none  # with trainer.devices=N: linear multiplies every LR by N


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's LR
    step_epochs: int = 10  # step: decay every N epochs
    gamma: float = 0.1  # step / plateau decay factor
    restart_epochs: int = 5  # cosine_restarts: first cycle length
    restart_mult: int = 1  # cosine_restarts: cycle length multiplier
    pct_start: float = 0.3  # onecycle: fraction of steps spent rising
    plateau_patience: int = 2
    cut_frac: float = 0.1  # stlr: fraction of steps spent rising
    ratio: float = 32.0  # stlr: how much smaller the lowest LR is than the peak


@dataclass
class AugmentConfig:
    name: AugmentName = AugmentName.basic
    # geometry
    scale_min: float = 0.35  # random resized crop: area fraction range
    scale_max: float = 1.0
    hflip: bool = True
    rotation: float = 0.0  # max degrees either way; 0 = off
    # colour and blur
    color_jitter: float = 0.0  # brightness, contrast and saturation strength; 0 = off
    hue: float = 0.0  # hue jitter (at most 0.5)
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: float = 2.0  # gaussian blur: sigma drawn from [0.1, blur_sigma]
    erasing_p: float = 0.0  # random erasing, after normalization
    # policies
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    autoaugment_policy: AutoAugmentPolicy = AutoAugmentPolicy.imagenet
    # batch mixing, with soft targets
    mixup_alpha: float = 0.0  # 0 = off
    cutmix_alpha: float = 0.0  # 0 = off
    mix_prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: chance of CutMix rather than MixUp


@dataclass
class TrainerConfig:
    epochs: int = 10
    resume: Optional[str] = None  # a checkpoint, a run folder, or "auto" (this run folder's last.pt)
    save_every: int = 0  # also keep checkpoints/epoch_NNN.pt every N epochs; 0 = only last/best
    device: Device = Device.auto
    devices: str = "1"  # processes, one per GPU (data-parallel): a number, or auto = every visible GPU
    sync_bn: bool = False  # with several processes on GPUs: BatchNorm statistics over the global batch
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    amp: Amp = Amp.auto
    channels_last: str = "auto"  # NHWC memory layout: auto = on CUDA, or true / false
    compile: bool = False  # torch.compile the model for training and validation
    grad_clip: Optional[float] = None  # max gradient norm
    # the optimizer steps once every N batches on their summed gradients: the update of an N-times
    # larger batch (data.batch_size x N per process) in the memory of one
    accumulate: int = 1
    # an exponential moving average of the weights, updated after every optimizer step (e.g. 0.999),
    # evaluated each epoch beside them (ema_val_* in metrics.csv); null = off
    ema: Optional[float] = None
    ema_warmup: bool = True  # the decay ramps up as min(ema, (1 + n) / (10 + n)) over the first n updates
    class_weights: ClassWeights = ClassWeights.none  # weigh the training loss by class frequency
    label_smoothing: float = 0.0
    monitor: Monitor = Monitor.val_acc  # chooses best.pt and drives early stopping
    patience: Optional[int] = None  # early stopping: epochs without improvement; null = off
    min_delta: float = 0.0


@dataclass
class AdaptConfig:
    name: AdaptName = AdaptName.none
    weight: float = 1.0  # the domain loss's weight in the training loss
    # the domain loss ramps in with 2 / (1 + exp(-10 p)) - 1 over the run's progress p (Ganin et al.)
    ramp: bool = True
    hidden: int = 256  # dann: width of the domain classifier's two hidden layers


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    # logger=mlflow (the keys below are refused with any other logger):
    # null: $MLFLOW_TRACKING_URI, else the store a resumed run used, else outputs/mlflow.db (SQLite)
    # with artifacts in outputs/mlartifacts; or a server (http://host:5000), or sqlite:///PATH.db
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # null: $MLFLOW_EXPERIMENT_NAME, else "finetune-cli"
    run_name: Optional[str] = None  # null: the run folder's name (a sweep job's: number and overrides)
    tags: Dict[str, str] = field(default_factory=dict)
    log_checkpoint: bool = False  # also checkpoints/best.pt as an artifact at the end (it can be large)


class Task(str, Enum):
    train = "train"
    lr_find = "lr_find"  # an exponential LR sweep that suggests optimizer.lr; nothing is trained or saved


class LRRule(str, Enum):
    steepest = "steepest"  # where the smoothed loss falls fastest against log LR
    valley = "valley"  # the middle of the longest stretch where the smoothed loss keeps falling (fastai's)
    minimum = "minimum"  # a tenth of the LR at the lowest smoothed loss


@dataclass
class LRFindConfig:
    """task=lr_find: the head's LR rises exponentially from start_lr to end_lr over `steps` training
    steps; every other group keeps its ratio to the head."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    diverge: Optional[float] = 4.0  # stop once the smoothed loss passes this multiple of its lowest; null = never
    smoothing: float = 0.98  # the loss's moving average factor (bias-corrected)
    rule: LRRule = LRRule.steepest  # the suggestion's rule (every rule's value is printed and saved)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plan: bool = False  # print the plan and exit without training
    preview: PreviewMode = PreviewMode.off  # preview=augment: a picture of what the model sees
    preview_images: int = 16
    task: Task = Task.train  # task=lr_find: sweep the LR and suggest optimizer.lr (lr_find.*), train nothing
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)
    cache_dir: Optional[str] = None  # synthetic data and weights; default $FINETUNE_CLI_CACHE


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=Config)
