"""The four client machines replay the recorded dialogues of transcripts.py exactly: every action and what
the session sees of the machine after every step (issue 26: a reshaping must not change a byte).

When a test here fails, the machine now answers differently from the recording: a regression unless the
change of bytes is intended (then record anew, see transcripts.py, and say so in the commit).
"""

import pytest
import transcripts


@pytest.mark.parametrize("protocol", transcripts.PROTOCOLS)
def test_recorded_dialogues_replay_exactly(protocol):
    modules = transcripts.package()
    dialogues = transcripts.load(protocol)
    assert len(dialogues) == transcripts.DIALOGUES
    for number, dialogue in enumerate(dialogues):
        got = transcripts.replay(modules, dialogue)
        if got == dialogue["steps"]:
            continue
        index = next(i for i, (new, old) in enumerate(zip(got, dialogue["steps"])) if new != old)
        pytest.fail("%s dialogue %d, config %r, tls %s: step %d (%r) gave\n%r\nrecorded\n%r\nafter %r" % (
            protocol, number, dialogue["config"], dialogue["tls"], index, dialogue["events"][index],
            got[index], dialogue["steps"][index], dialogue["events"][:index]))


def test_a_fresh_recording_matches_the_corpus():
    """The generator still produces the stored corpus, so it can be rerun to extend it."""
    modules = transcripts.package()
    for protocol in transcripts.PROTOCOLS:
        assert transcripts.record(modules, protocol, count=50) == transcripts.load(protocol)[:50]
