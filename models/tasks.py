"""The task table: what each task type is. Uni-Perceiver's tasks compare encoded inputs with encoded targets; the
dense-prediction tasks of Mod-Squad (segmentation, saliency, normals, edges, depth) predict a map per pixel through a
per-task head. Data, trainer, evaluation, expert analysis and config read a task type's entry instead of testing its
name, so a new task type is one ``TaskSpec`` here plus its functions (a loss method on ``UniPerceiver``, a metric in
``train/evaluate.py``).
"""

from dataclasses import dataclass

INPUTS = ("image", "video", "text")
TARGETS = ("classes", "captions", "vocabulary", "pixels")
# Dense task families: how a dense task's head output is read, its loss and its metric (models/dense.py,
# train/dense_metrics.py); each reads labels of one encoding of data_prep/schema.py. ``regression`` is Taskonomy's
# L1 tasks (keypoints, its 16-bit edges, reshading, unsupervised segmentation), ``curvature`` its MSE task,
# ``soft_classification`` its soft-label object and scene classification (a pooled head, no map).
DENSE_KINDS = {"segmentation": "index", "saliency": "binary", "edge": "binary", "normals": "normal", "depth": "scalar",
               "regression": "scalar", "curvature": "scalar", "soft_classification": "soft"}


@dataclass(frozen=True)
class TaskSpec:
    """One task type.

    Args:
        inputs: what a sample's input is: ``image``, ``video`` (frames) or ``text``.
        targets: what the inputs are compared with: ``classes`` (the dataset's class names, encoded every step),
            ``captions`` (each sample's own caption: retrieval in the batch), ``vocabulary`` (every token as a
            one-token sentence: masked tokens, next caption tokens) or ``pixels`` (per-image labels read through a
            per-task head: label maps for dense prediction, or Taskonomy's soft class distributions).
        loss: the ``UniPerceiver`` method that computes the task's loss and logits.
        metric: how ``train/evaluate.py`` scores the val split: ``topk`` (top-1/top-5), ``recall`` (R@1/5/10 both
            ways), ``caption`` (beam search, BLEU-4 and CIDEr-D), ``token_accuracy`` (masked tokens) or ``dense``
            (the dense family's meter: mIoU, maxF, angular error, edge F, depth RMSE).
        reads_caption: samples carry a caption the task uses (retrieval pairs, captioning's teacher forcing).
        mixup: timm's Mixup/CutMix applies (image classification only).
        dense: the dense family (``DENSE_KINDS``) of a ``pixels`` task; its label map is ``label`` in the dataset's
            ``dense.json`` unless the task config names another.
        label: the dense label a task of this type reads by default; several labels, comma-separated, are stacked
            as channels of one target (curvature's two principal curvatures).
        temperature_of: the type whose learned temperature this one uses (None: its own). Video captioning is
            captioning with frames in: it decodes with captioning's temperature, so a model trained on image
            captions captions videos zero-shot.
    """

    inputs: str
    targets: str
    loss: str
    metric: str
    reads_caption: bool = False
    mixup: bool = False
    dense: str | None = None
    label: str | None = None
    temperature_of: str | None = None

    def __post_init__(self):
        assert self.inputs in INPUTS and self.targets in TARGETS, self
        assert (self.targets == "pixels") == (self.dense in DENSE_KINDS), self

    @property
    def encoding(self) -> str | None:
        """The label encoding (data_prep/schema.py) a dense task reads; None for the others."""
        return DENSE_KINDS.get(self.dense)

    @property
    def target_set(self) -> bool:
        """Targets are a set shared by every sample (class names, vocabulary) that ``split_targets`` can split."""
        return self.targets in ("classes", "vocabulary")


TASKS: dict[str, TaskSpec] = {
    "image_classification": TaskSpec("image", "classes", "classification", "topk", mixup=True),
    "image_text_retrieval": TaskSpec("image", "captions", "retrieval", "recall", reads_caption=True),
    "video_classification": TaskSpec("video", "classes", "classification", "topk"),
    "video_text_retrieval": TaskSpec("video", "captions", "retrieval", "recall", reads_caption=True),
    "mlm": TaskSpec("text", "vocabulary", "masked_language_modelling", "token_accuracy"),
    "captioning": TaskSpec("image", "vocabulary", "captioning", "caption", reads_caption=True),
    "video_captioning": TaskSpec("video", "vocabulary", "captioning", "caption", reads_caption=True,
                                 temperature_of="captioning"),
    # Dense prediction (Mod-Squad, M3ViT; PASCAL-Context, NYUD-v2, Taskonomy): a per-task head on the patch tokens.
    "semseg": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="segmentation", label="semseg"),
    "human_parts": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="segmentation", label="human_parts"),
    "saliency": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="saliency", label="saliency"),
    "normals": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="normals", label="normals"),
    "edge": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="edge", label="edge"),
    "depth": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="depth", label="depth"),
    # Taskonomy's other tasks (Mod-Squad's 13; its depth and normals are the types above with tasks[].label).
    **{name: TaskSpec("image", "pixels", "dense_prediction", "dense", dense="regression", label=name)
       for name in ("keypoints2d", "keypoints3d", "edge_occlusion", "edge_texture", "reshading", "segment_unsup2d",
                    "segment_unsup25d")},
    "curvature": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="curvature",
                          label="principal_curvature_1,principal_curvature_2"),
    "class_object": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="soft_classification",
                             label="class_object"),
    "class_scene": TaskSpec("image", "pixels", "dense_prediction", "dense", dense="soft_classification",
                            label="class_scene"),
}
# The similarity task types with a temperature of their own, in order: it indexes the per-task-type temperatures
# (logit_scale). Dense types have none; a type with ``temperature_of`` uses that type's.
TASK_TYPES = tuple(name for name, spec in TASKS.items() if spec.targets != "pixels" and spec.temperature_of is None)
DENSE_TYPES = tuple(name for name, spec in TASKS.items() if spec.targets == "pixels")


def modality_twins(a: str, b: str) -> bool:
    """Two task types that differ only in their visual input (image vs video: classification, retrieval,
    captioning): a model trained on one is evaluated zero-shot on the other with the same task id."""
    sa, sb = task_spec(a), task_spec(b)
    return {sa.inputs, sb.inputs} <= {"image", "video"} and (sa.targets, sa.loss, sa.metric) == (
        sb.targets, sb.loss, sb.metric)


def task_spec(task_type: str) -> TaskSpec:
    """The table entry of ``task_type`` (ValueError naming the known types otherwise)."""
    if task_type not in TASKS:
        raise ValueError(f"unknown task type {task_type!r}; known: {', '.join(TASKS)}")
    return TASKS[task_type]
