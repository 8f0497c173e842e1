"""gptjax.rows: the one set of JSONL / CSV / TSV row readers evaluation and fine-tuning
share; a bad row is one error naming file:line, of the class the caller's users catch."""

import pytest


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_each_reader_names_file_and_line(tmp_path):
    from gptjax import rows

    bad_json = _write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": \n')
    with pytest.raises(rows.RowError, match=r"a\.jsonl:3: malformed JSON line"):
        list(rows.read_jsonl(bad_json))
    not_object = _write(tmp_path / "b.jsonl", '{"x": 1}\n[1, 2]\n')
    with pytest.raises(rows.RowError, match=r"b\.jsonl:2: expected a JSON object, got list"):
        list(rows.read_jsonl(not_object))
    short = _write(tmp_path / "c.csv", "a,b\n1,2\n3\n")
    with pytest.raises(ValueError, match=r"c\.csv:3: row does not have the header's 2 columns"):
        list(rows.read_rows(short, error=ValueError))
    tsv = _write(tmp_path / "d.tsv", "a\tb\n1\t2\n\n1\t2\t3\n")
    with pytest.raises(KeyError, match=r"d\.tsv:4: 3 tab-separated columns, expected 2 \(a, b\)"):
        list(rows.read_rows(tsv, error=KeyError, quoted_tsv=False))
    assert list(rows.read_rows(_write(tmp_path / "e.jsonl", '{"x": 1}\n\n{"x": 2}\n'))) == [
        (1, {"x": 1}),
        (3, {"x": 2}),
    ]


def test_tsv_quotes_group_fields_only_when_asked(tmp_path):
    """Evaluation reads a .tsv as CSV with tabs; fine-tuning as GLUE does (quotes are text)."""
    from gptjax import rows

    path = _write(tmp_path / "q.tsv", 'text\tlabel\n"say ""hi"""\t1\n')
    assert list(rows.read_rows(path)) == [(2, {"text": 'say "hi"', "label": "1"})]
    glue = list(rows.read_rows(path, quoted_tsv=False))
    assert glue == [(2, {"text": '"say ""hi"""', "label": "1"})]


def test_eval_and_finetune_report_a_bad_row_alike(tmp_path):
    """One reader: the same short StoryCloze row is the same message in both, each in the
    error class its command catches."""
    from gptjax import finetune_data as fd
    from gptjax.eval import tasks

    header = "InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
    header += "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
    path = _write(tmp_path / "cloze.csv", header + "a,b,c,d,e,f,1\na,b,c\n")
    with pytest.raises(tasks.EvalInputError) as eval_error:
        tasks.TASKS["storycloze"].load(path)
    with pytest.raises(fd.FinetuneDataError) as finetune_error:
        fd.TASKS["storycloze"].read(path)
    want = f"{path}:3: row does not have the header's 7 columns"
    assert str(eval_error.value) == str(finetune_error.value) == want
