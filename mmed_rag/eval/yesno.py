"""Yes/no extraction from free-text VQA answers.

:func:`parse_yes_no` turns an answer into ``"yes"``, ``"no"`` or ``None``. ``None`` means the answer does not
commit to either (it hedges, declines, or says something the rule cannot read); it is never silently ``"no"``.

Why the first sentence only: answers lead with their verdict and then justify or qualify it ("No. However, in
some cases ..."). Later sentences add caveats, second thoughts or answers to other questions; reading them would
let a caveat overturn the verdict. So everything after the first sentence is ignored.

The rule, applied to the lower-cased text with curly quotes made straight:

1. Preamble is dropped: list markers ("- ", "2. "), an "Answer:" prefix, an echo of the question up to its
   "?" (an answer that is only an echoed question gives ``None``), and a leading parenthetical that text
   follows ("(if X means Y, then the answer would be) Yes." reads as "Yes.").
2. The first sentence is taken: it ends at ``. ! ? ;`` followed by a space or the end, outside parentheses and
   double quotes, never at "e.g."-style abbreviations, inside decimals or before "; therefore"/"; so" (the
   conclusion drawn belongs to the sentence); a line break also ends it.
3. A bare leading "yes"/"no" is the answer ("No.", "Yes, it is.", "No (based on ...)"). "No" that opens a noun
   phrase ("No evidence of ...", "No information ...") is not bare and goes on to step 4. "Yes or no" is
   talk about the options, never an answer.
4. Otherwise the sentence is read, in priority order:

   a. an explicit answer: "the answer is/would (likely) be no", "the likelihood/assumption is no", "so likely
      no", 'resulting in a "yes"', a label closing the sentence after a comma ("Based on the report, no."), or
      an inference clause ("it is implied that no mass is visible", "can be interpreted as normal"), whose
      proposition is the answer: ``"no"`` when negated, else ``"yes"``;
   b. uncertainty or missing information ("cannot be determined", "not mentioned", "does not specify",
      "unclear", "depends", "no information", "without additional ...") gives ``None``;
   c. a negated finding ("there is no", "no <noun>", "not seen", "does not show", "is not", "without",
      "negative for", "absent") gives ``"no"``; d. an asserted finding ("there is a", "shows", "evidence of",
      "consistent with", "is present") gives ``"yes"``. When both c and d occur, the earlier cue wins: the
      answer's subject comes first ("There is a mass but no effusion" answers a question about the mass);
   e. anything else (e.g. "Normal.") gives ``None``.

Polarity is read from the answer's own wording, without the question: "The heart is not enlarged" is "no" and
"Normal." is ``None``, which suits questions phrased "Is there X?" / "Is X <finding>?". Only "yes" and "no" are
labels: "Yeah", "Yep" and "Nope" give ``None``, as does "Yesterday ..." and "Not sure".

Steps c-d read any finding word, so a string of unrelated words ("hemidiaphragms modality > visualized black
open ...", what an untrained model writes) can score as an answer. The ``strict`` rule keeps every step but
accepts a c-d reading only from a sentence with answer structure: it opens like an English sentence (a
determiner, pronoun, "there", "no", or a connective such as "according"/"based"), or with the finding cue itself
within its first three words ("Cardiomegaly is present."), and it ends with a sentence mark unless it is short
(six words or fewer: "no pneumothorax"). Every finding-read answer in the released VQA files has that structure;
of strings of random words from the tiny model's vocabulary, 14% are read as yes/no by the standard rule, 0.75%
by the strict one.

``rule="authors"`` is the MMed-RAG authors' own rule (:func:`authors_yes_no`), for reproducing their pairs and
numbers; it replaces every step above. :func:`read_yes_no` says which step gave the label, so an
evaluation can count the readings that rest on a finding word alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

YES = "yes"
NO = "no"

# --- normalisation and preamble ---------------------------------------------------------------------------------

_CURLY_DOUBLE_QUOTES = re.compile("[\u201c\u201d\u201e\u201f\u00ab\u00bb]")
_CURLY_SINGLE_QUOTES = re.compile("[\u2018\u2019\u201a\u201b]")

# "- ", "* ", "• ", "– ", "1. ", "10) ". Numbers need a space after them so "2.0 cm" is never a marker.
_LIST_MARKER = re.compile(r"^(?:[-*\u2022\u2013\u2014]+\s*|\d{1,3}[.)]\s+)")
_ANSWER_PREFIX = re.compile(r"^(?:final\s+)?answer\s*[:\-\u2013\u2014]\s*")
# An echoed question opens with an auxiliary or wh-word and runs to its "?". It may hold "2.0" but not ". ",
# so a "?" in a later sentence never swallows the real first sentence ("No. Is that all? ...").
_ECHOED_QUESTION = re.compile(
    r"^(?:is|are|was|were|does|do|did|can|could|has|have|had|will|would|should|may|might|shall|"
    r"what|which|where|when|who|whom|whose|why|how)\b(?!\s+not\b)"
    r"(?:[^?.!;\n]|\.(?=\S))*\?[\s\-:\u2013\u2014]*"
)
_LEADING_PARENTHETICAL = re.compile(r"^\((?P<inner>[^()]*)\)\s*")

# --- sentence boundaries ----------------------------------------------------------------------------------------

_SENTENCE_END = ".!?;"
_ABBREVIATION_BEFORE_DOT = re.compile(r"\b(?:e\.g|i\.e|etc|vs|approx|cf|fig|dr|mr|mrs|ms|st)$", re.IGNORECASE)
# "X; therefore Y" is one sentence: the clause after the semicolon is the conclusion drawn from X.
_CONCLUSION_AFTER_SEMICOLON = re.compile(r"\s+(?:therefore|so|thus|hence|consequently)\b", re.IGNORECASE)

# --- bare answers -----------------------------------------------------------------------------------------------

_YES_NO = r"(?:yes|no)"
# "yes or no", "'yes' or 'no'", "yes/no": the options named, not chosen.
_OPTION_PAIR = re.compile(rf"""["']?{_YES_NO}["']?\s*(?:or|/)\s*["']?{_YES_NO}\b["']?""")
_BARE_ANSWER = re.compile(rf"""^["']?(?P<label>{_YES_NO})\b["']?(?P<rest>.*)$""", re.DOTALL)
# Words that can follow a bare "no" without a comma ("No it is not", "No because ..."); any other word makes
# "no" a determiner ("No effusion", "No information").
_CLAUSE_AFTER_BARE_NO = re.compile(
    r"^\s+(?:it|there|this|that|these|those|they|the|a|an|i|we|not|as|because|since|based|but|however|"
    r"according|given|due)\b"
)

# --- sentence analysis ------------------------------------------------------------------------------------------

_HEDGE = r"(?:likely|probably|presumably|possibly|most\s+likely|\w+ly)"
# (a) "the answer [based on the report] would likely be no", "the likelihood is no", "the assumption is no".
_ANSWER_IS_LABEL = re.compile(
    r"\b(?:answer|response|likelihood|assumption|conclusion)\b"
    r"(?:\s+(?!not\b|cannot\b|can't\b)[\w'\",]+){0,8}?"
    rf"\s+(?:is|would|should|could|will|may|might)(?:\s+{_HEDGE})*(?:\s+be)?(?:\s+{_HEDGE})*"
    rf"""\s*[:\-]?\s*["']?(?P<label>{_YES_NO})\b"""
)
# (a) "so likely no.", "therefore, yes": the label must end the clause so "so no effusion ..." is not read here.
_CONNECTIVE_THEN_LABEL = re.compile(
    rf"""\b(?:so|therefore|thus|hence)\s*,?\s+(?:{_HEDGE}\s+)?["']?(?P<label>{_YES_NO})\b["']?(?=\s*(?:$|[^\w\s]))"""
)
_RESULTING_IN_LABEL = re.compile(rf"""\bresult(?:s|ed|ing)?\s+in\s+(?:an?\s+)?["']?(?P<label>{_YES_NO})\b""")
# (a) "Based on the report, no." — a label standing alone at the end of the sentence.
_CLOSING_LABEL = re.compile(rf"""[,:\-\u2013\u2014]\s*["']?(?P<label>{_YES_NO})["']?\s*[.!)"']*$""")
# (a) an inference whose proposition is the answer: "it's implied that no mass is visible".
_INFERENCE_CLAUSE = re.compile(
    r"\b(?:it'?s|it\s+is|it\s+can\s+be)\s+(?:implied|inferred|assumed|concluded)\s+that\s+"
    r"|\bimplies\s+that\s+"
    r"|\bcan\s+be\s+(?:interpreted|considered|regarded|assumed|inferred)\s+(?:as\s+|that\s+|to\s+be\s+)?"
)
# The inference's reason ("... as normal since the lungs are clear") is not its proposition.
_REASON_CLAUSE = re.compile(r"\b(?:since|because|as|given|due\s+to)\b")

# (b) Declining to commit, or saying the information is missing.
_UNCERTAIN = re.compile(
    r"\b(?:cannot|can\s*not|can't|could\s+not|couldn't|unable\s+to|not\s+possible\s+to|impossible\s+to|"
    r"difficult\s+to|hard\s+to|not\s+able\s+to)\s+(?:be\s+)?(?:\w+ly\s+)?"
    r"(?:determine|answer|provide|say|tell|confirm|assess|infer|derive|evaluate|comment|conclude|establish|"
    r"judge|know|rule|exclude|decide|give|make|be\s+sure)\w*"
    r"|\b(?:does|do|did)\s*(?:not|n't)\s+(?:\w+ly\s+)?"
    r"(?:mention|specify|state|say|provide|comment|address|describe|include|report|discuss|reference)\w*"
    r"|\bnot\s+(?:\w+ly\s+)?(?:mentioned|specified|stated|provided|reported|described|addressed|documented|"
    r"available|confirmed|given|known|discussed|included|determinable)\b"
    r"|\bno\s+(?:information|mention|answer|data|details?)\b"
    r"|\b(?:insufficient|not\s+enough)\s+(?:information|data|detail|evidence)"
    r"|\bwithout\s+(?:additional|further|more)\b"
    r"|\b(?:it'?s|it\s+is|it\s+was|it\s+remains|remains)\s+(?:not|un)\s*clear\b|\bunclear\b"
    r"|\bnot\s+clear\s+(?:whether|if|what|how|from)\b"
    r"|\b(?:inconclusive|indeterminate|undetermined|uncertain|unsure|unknown|equivocal|ambiguous)\b"
    r"|\bnot\s+(?:sure|certain)\b|\bmay\s+or\s+may\s+not\b|\bdepend(?:s|ing)?\b"
)

# (c) A finding stated as absent.
_NEGATED_FINDING = re.compile(
    r"\bthere(?:'s|\s+is|\s+are|\s+was|\s+were|\s+has\s+been|\s+have\s+been)\s+no\b"
    r"|\bthere(?:'s|\s+is|\s+are|\s+was|\s+were)\s*(?:not|n't)\b"
    r"|\bno\s+[a-z]|\bnothing\b|\bnone\b"
    r"|\bnot\s+(?:\w+ly\s+)?(?:seen|present|identified|visible|visualized|noted|observed|detected|evident|"
    r"demonstrated|appreciated|enlarged|shown|found|apparent|indicated|suggested|suggestive|consistent)\b"
    r"|\b(?:does|do|did)\s*(?:not|n't)\s+(?:\w+ly\s+)?"
    r"(?:show|demonstrate|reveal|indicate|suggest|appear|have|contain|exhibit|display|depict)\b"
    r"|\b(?:is|are|was|were)\s*(?:not|n't)\b"
    r"|\bwithout\b|\bnegative\s+for\b|\bfree\s+of\b|\babsent\b|\babsence\s+of\b|\bruled\s+out\b"
)

# (d) A finding stated as present.
_ASSERTED_FINDING = re.compile(
    r"\bthere(?:'s|\s+is|\s+are|\s+was|\s+were|\s+appears?\s+to\s+be|\s+seems?\s+to\s+be)\s+"
    r"(?!no\b|not\b|nothing\b|none\b|n't)\w"
    r"|\b(?:shows?|showing|demonstrates?|demonstrating|reveals?|revealing|depicts?|displays?|exhibits?)\s+"
    r"(?!no\b|not\b|nothing\b|none\b)\w"
    r"|\b(?:evidence|signs?|findings?|features?)\s+of\b"
    r"|\b(?:consistent|compatible)\s+with\b|\b(?:suggestive|indicative|diagnostic)\s+of\b|\bpositive\s+for\b"
    r"|\b(?:is|are|was|were|appears?|remains?)\s+(?:\w+ly\s+)?"
    r"(?:present|seen|noted|visible|identified|observed|evident|demonstrated|detected|appreciated|visualized)\b"
)


# How a label was found (:attr:`Reading.how`): a bare leading label, an explicit answer (step a), hedging (b), a
# finding cue (c-d) in a sentence with answer structure, a finding cue in words without it, nothing to read.
How = Literal["bare", "explicit", "uncertain", "finding", "unstructured", "nothing", "authors"]
HOWS: tuple[str, ...] = ("bare", "explicit", "uncertain", "finding", "unstructured", "nothing", "authors")
YES_NO_RULES: tuple[str, ...] = ("standard", "strict", "authors")

# Words an English answer sentence opens with before its finding (determiners, pronouns, "there", connectives).
_SENTENCE_OPENER = re.compile(
    r"^(?:the|a|an|this|these|that|those|there|it|its|both|either|neither|no|none|nothing|all|any|some|"
    r"according|based|given|in|on|from|as|upon|after|although|though|while|however|overall|here|we|i|"
    r"he|she|they|his|her|their|our|my)\b"
)
_CUE_WITHIN_WORDS = 3
_SHORT_ANSWER_WORDS = 6  # a fragment this short needs no closing mark ("no pneumothorax")
_SENTENCE_MARK_AT_END = re.compile(r"""[.!?;]["')\]]*$""")


@dataclass(frozen=True)
class Reading:
    """A free-text answer's label (``"yes"``, ``"no"`` or ``None``) and which step of the rule gave it."""

    label: str | None
    how: How


def parse_yes_no(text: str, rule: str = "standard") -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (no commitment) for a free-text answer, read from its first sentence.

    ``rule="strict"`` also gives ``None`` for a finding word in text without answer structure (module docstring).
    """
    return read_yes_no(text, rule).label


def read_yes_no(text: str, rule: str = "standard") -> Reading:
    """:func:`parse_yes_no`'s label and how it was found."""
    if rule not in YES_NO_RULES:
        raise ValueError(f"yes/no rule: expected one of {', '.join(YES_NO_RULES)}, got {rule!r}")
    if rule == "authors":
        return Reading(authors_yes_no(text), "authors")
    body = _strip_preamble(_normalise(text))
    if not body:
        return Reading(None, "nothing")
    sentence = first_sentence(body)
    bare = _bare_answer(sentence)
    if bare is not None:
        return Reading(bare, "bare")
    sentence = _OPTION_PAIR.sub(" ", sentence)
    explicit = _explicit_answer(sentence)
    if explicit is not None:
        return Reading(explicit, "explicit")
    if _UNCERTAIN.search(sentence):
        return Reading(None, "uncertain")
    label, cue = _finding_polarity(sentence)
    if label is None:
        return Reading(None, "nothing")
    if _has_answer_structure(sentence, cue):
        return Reading(label, "finding")
    return Reading(None if rule == "strict" else label, "unstructured")


def gold_rule(rule: str) -> str:
    """The rule that reads gold answers when predictions are read by ``rule``: the authors' rule reads both sides
    (as their pair builder did); otherwise the standard rule, so a gold answer never depends on the strictness."""
    return "authors" if rule == "authors" else "standard"


def authors_yes_no(text: str) -> str:
    """The MMed-RAG authors' own rule (``parse_answer`` of their deleted pair builder, read at commit f2023ea).

    The words before the first "." (commas removed, split at whitespace): ``"no"`` when "No", "no" or "not" is
    one of them, else ``"yes"``. Case matters ("NO" and "Not" read as yes), nothing is unparseable (an empty or
    hedging answer reads as yes), and a negated finding ("There is no effusion") reads as no. Where it and the
    standard rule disagree on the released answers is counted in the README.
    """
    words = text.split(".")[0].replace(",", "").split()
    return NO if {"No", "no", "not"} & set(words) else YES


def _has_answer_structure(sentence: str, cue: int) -> bool:
    """Whether a finding-read sentence is a sentence: opened like one, and closed by a sentence mark or short."""
    opened = bool(_SENTENCE_OPENER.match(sentence)) or len(sentence[:cue].split()) < _CUE_WITHIN_WORDS
    closed = bool(_SENTENCE_MARK_AT_END.search(sentence)) or len(sentence.split()) <= _SHORT_ANSWER_WORDS
    return opened and closed


def first_sentence(text: str) -> str:
    """The text up to and including its first sentence end, stripped.

    A sentence ends at ``. ! ? ;`` followed by whitespace or the end of the text, or at a line break. Marks
    inside parentheses or double quotes do not end it ("No (see above. It is fine)."), except a quoted
    sentence that closes the quote ('... resulting in a "Yes." However ...'); nor do "e.g."-style
    abbreviations, decimals ("2.0 cm") or a semicolon before "therefore"/"so"/"thus"/"hence".
    """
    text = text.strip()
    depth = 0
    in_quote = False
    for i, char in enumerate(text):
        if char == "\n":
            return text[:i].strip()
        if char == '"':
            in_quote = not in_quote
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)  # a stray ")" must not block every later boundary
        elif char in _SENTENCE_END and depth == 0:
            after = text[i + 1 : i + 2]
            if in_quote:
                if after == '"' and _is_boundary(text, i + 2):
                    return text[: i + 2].strip()
            elif _is_boundary(text, i + 1) and not _continues(text, i):
                return text[: i + 1].strip()
    return text


def _is_boundary(text: str, index: int) -> bool:
    return index >= len(text) or text[index].isspace()


def _continues(text: str, index: int) -> bool:
    """Whether the sentence mark at ``index`` is not a sentence end: an abbreviation's dot, "; therefore"."""
    if text[index] == ".":
        return _ABBREVIATION_BEFORE_DOT.search(text[:index]) is not None
    if text[index] == ";":
        return _CONCLUSION_AFTER_SEMICOLON.match(text, index + 1) is not None
    return False


def _normalise(text: str) -> str:
    text = _CURLY_DOUBLE_QUOTES.sub('"', text)
    text = _CURLY_SINGLE_QUOTES.sub("'", text)
    return text.strip().lower()


def _strip_preamble(text: str) -> str:
    """Drop list markers, an "Answer:" prefix, an echoed question and a leading parenthetical, in any order."""
    while True:
        before = text
        for pattern in (_LIST_MARKER, _ANSWER_PREFIX, _ECHOED_QUESTION):
            text = pattern.sub("", text, count=1).lstrip()
        text = _drop_leading_parenthetical(text)
        if text == before:
            return text


def _drop_leading_parenthetical(text: str) -> str:
    match = _LEADING_PARENTHETICAL.match(text)
    if match is None:
        return text
    rest = text[match.end() :]
    # A parenthetical that is the whole answer is the answer: read what it says.
    return rest if rest else match["inner"].strip()


def _bare_answer(sentence: str) -> str | None:
    """The label of a sentence that opens with a bare "yes"/"no" word; None if it does not."""
    if _OPTION_PAIR.match(sentence):
        return None
    match = _BARE_ANSWER.match(sentence)
    if match is None:
        return None
    label, rest = match["label"], match["rest"]
    if label == NO and rest[:1].isspace() and rest.strip()[:1].isalnum() and not _CLAUSE_AFTER_BARE_NO.match(rest):
        return None  # "No evidence of ...": a noun phrase, read as a sentence
    return label


def _explicit_answer(sentence: str) -> str | None:
    for pattern in (_ANSWER_IS_LABEL, _CONNECTIVE_THEN_LABEL, _RESULTING_IN_LABEL, _CLOSING_LABEL):
        match = pattern.search(sentence)
        if match is not None:
            return match["label"]
    inference = _INFERENCE_CLAUSE.search(sentence)
    if inference is None:
        return None
    proposition = _REASON_CLAUSE.split(sentence[inference.end() :], maxsplit=1)[0]
    if _UNCERTAIN.search(proposition):
        return None
    return NO if _NEGATED_FINDING.search(proposition) else YES


def _finding_polarity(sentence: str) -> tuple[str | None, int]:
    """``"no"`` for a negated finding, ``"yes"`` for an asserted one, the earlier cue winning (and where that cue
    starts); ``(None, -1)`` when there is neither."""
    negated = _NEGATED_FINDING.search(sentence)
    asserted = _ASSERTED_FINDING.search(sentence)
    if negated is not None and (asserted is None or negated.start() <= asserted.start()):
        return NO, negated.start()
    if asserted is not None:
        return YES, asserted.start()
    return None, -1
