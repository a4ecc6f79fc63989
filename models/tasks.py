"""The task table: what each task type is in the Uni-Perceiver formulation (every task compares encoded inputs with
encoded targets). Data, trainer, evaluation, expert analysis and config read a task type's entry instead of testing
its name, so a new task type is one ``TaskSpec`` here plus its functions (a loss method on ``UniPerceiver``, a
metric in ``train/evaluate.py``).
"""

from dataclasses import dataclass

INPUTS = ("image", "video", "text")
TARGETS = ("classes", "captions", "vocabulary")


@dataclass(frozen=True)
class TaskSpec:
    """One task type.

    Args:
        inputs: what a sample's input is: ``image``, ``video`` (frames) or ``text``.
        targets: what the inputs are compared with: ``classes`` (the dataset's class names, encoded every step),
            ``captions`` (each sample's own caption: retrieval in the batch) or ``vocabulary`` (every token as a
            one-token sentence: masked tokens, next caption tokens).
        loss: the ``UniPerceiver`` method that computes the task's loss and logits.
        metric: how ``train/evaluate.py`` scores the val split: ``topk`` (top-1/top-5), ``recall`` (R@1/5/10 both
            ways), ``caption`` (beam search, BLEU-4 and CIDEr-D) or ``token_accuracy`` (masked tokens).
        reads_caption: samples carry a caption the task uses (retrieval pairs, captioning's teacher forcing).
        mixup: timm's Mixup/CutMix applies (image classification only).
    """

    inputs: str
    targets: str
    loss: str
    metric: str
    reads_caption: bool = False
    mixup: bool = False

    def __post_init__(self):
        assert self.inputs in INPUTS and self.targets in TARGETS, self

    @property
    def target_set(self) -> bool:
        """Targets are a set shared by every sample (class names, vocabulary) that ``split_targets`` can split."""
        return self.targets != "captions"


TASKS: dict[str, TaskSpec] = {
    "image_classification": TaskSpec("image", "classes", "classification", "topk", mixup=True),
    "image_text_retrieval": TaskSpec("image", "captions", "retrieval", "recall", reads_caption=True),
    "video_classification": TaskSpec("video", "classes", "classification", "topk"),
    "video_text_retrieval": TaskSpec("video", "captions", "retrieval", "recall", reads_caption=True),
    "mlm": TaskSpec("text", "vocabulary", "masked_language_modelling", "token_accuracy"),
    "captioning": TaskSpec("image", "vocabulary", "captioning", "caption", reads_caption=True),
}
TASK_TYPES = tuple(TASKS)  # order matters: it indexes the per-task-type temperatures (logit_scale)


def task_spec(task_type: str) -> TaskSpec:
    """The table entry of ``task_type`` (ValueError naming the known types otherwise)."""
    if task_type not in TASKS:
        raise ValueError(f"unknown task type {task_type!r}; known: {', '.join(TASKS)}")
    return TASKS[task_type]
