import io

from mrcnn_tf.progress import Progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_a_line_every_tenth_and_the_total():
    out = io.StringIO()
    p = Progress(200, "evaluation", stream=out)
    for _ in range(200):
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("evaluation: 20/200 images")
    assert lines[-1].startswith("evaluation: 200/200 images") and "ETA 0:00:00" in lines[-1]


def test_terminal_line_is_rewritten_and_unknown_totals_have_no_eta():
    out = _Tty()
    p = Progress(None, "create_tfrecord")
    p.stream, p.tty = out, True
    for _ in range(3):
        p.update(2)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "create_tfrecord: 6 images" in text and "ETA" not in text
    out = io.StringIO()
    p = Progress(None, "x", stream=out)
    p.update(5)
    p.close()  # not a terminal, no total: one line at the end
    assert out.getvalue().splitlines() == [out.getvalue().strip()]
    assert out.getvalue().startswith("x: 5 images")
