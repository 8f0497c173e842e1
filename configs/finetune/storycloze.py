"""StoryCloze (csv: InputSentence1-4, RandomFifthSentenceQuiz1/2,
AnswerRightEnding), multiple choice over 2 endings. The paper fine-tunes on the 2016
validation set and reports on the test set. Not shipped: set the paths.

Give the files with --config.task.train=... --config.task.dev=..., e.g.
storycloze/cloze_test_val__spring2016.csv and
storycloze/cloze_test_test__spring2016.csv.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="storycloze"),
    )
