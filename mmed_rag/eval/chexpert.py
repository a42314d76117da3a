"""Clinical-finding F1 from a rule-based labeller of chest X-ray reports: an approximation of CheXpert labels.

The label set is CheXpert's 14 observations (Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with
Uncertainty Labels and Expert Comparison", AAAI 2019). The labels come from regular expressions and NegEx-style
cue words, not from the CheXpert labeler (NLTK + dependency-parse patterns) or CheXbert (a BERT model). This is an
approximation for comparing report generators on the same footing, not a replacement: rule-based labellers miss
paraphrases and long-range negation, and the numbers are not comparable with papers that report CheXpert or
CheXbert F1.

Labels per observation: 1 positive, 0 negative, -1 uncertain, None not mentioned. A report's label is the
strongest of its mentions (1 over -1 over 0, as the CheXpert aggregator does).

How a mention is labelled (per sentence; sentences end at ``. ; ! ?`` or a line break):

1. Finding phrases (:data:`MENTION_PATTERNS`, e.g. "cardiomegaly", "effusion", "opacit") are found, minus
   :data:`EXCLUSION_PATTERNS` ("pleural scar" is Pleural Other, not Lung Opacity; "calcified nodule" is not a Lung
   Lesion; "pericardial effusion" is not a Pleural Effusion).
2. Anatomy without a finding word (:data:`ANATOMY_PATTERNS`: "heart size", "cardiac silhouette", "mediastinum",
   "cardiomediastinal silhouette") counts only with a predicate next to it: a normal one ("normal heart size",
   "heart size is normal", "within normal limits", "unremarkable", "not enlarged") labels 0; an enlargement
   ("enlarged", "widened", "prominent", "is large") makes it a finding mention, labelled as in 3. "Heart size is
   stable" labels nothing (the CheXpert labeler would call it positive). "Cardiomediastinal" counts for both
   Cardiomegaly and Enlarged Cardiomediastinum when normal, for Enlarged Cardiomediastinum only when enlarged.
3. In order: a "cannot exclude"-type phrase near the mention gives -1; a negation cue gives 0; an uncertainty cue
   gives -1; otherwise 1. Pre-negation cues ("no", "not", "without", "negative for", "free of", "clear of",
   "absence of", "rule out", "resolved", "history of") count up to :data:`NEGATION_WINDOW` words before the
   mention; post-negation cues ("is not seen", "are absent", "has resolved", "is normal") up to the same distance
   after it. Pseudo-negations ("no change", "no interval increase", "not only") are not cues. A scope ends at
   "but", "however", "although", "which", "except", "with", "there is" and similar. A comma ends it too, unless
   the list goes on with "or"/"nor" or the next item has no size, side or state word of its own: "no
   pneumothorax, effusion, or consolidation" and "no pneumothorax, effusion, consolidation" negate all three, "no
   pneumothorax, small effusion" only the first. Uncertainty cues ("may", "possible", "likely", "suggest",
   "questionable", "borderline", "versus", "evaluation for", "?") use the same scope, except that one after the
   mention stops at "and" ("atelectasis and possible pneumonia" hedges only the pneumonia).

Choices, all CheXpert's unless said:

- Only explicit mentions count: "lungs are clear" says nothing about opacity, consolidation, pneumonia or edema.
  "Clear of consolidation" does negate consolidation.
- No Finding is 1 when no observation other than Support Devices is 1 or -1, and no other abnormality
  (:data:`OTHER_FINDING_PATTERN`: emphysema, granuloma, calcification, degenerative change, scoliosis, ...) is
  positive or uncertain; otherwise None (never 0). An empty report gets no labels at all (ours).
- Calcified granulomas and calcified nodules are not Lung Lesions (CheXpert's lesion list has neither); they
  block No Finding. "Heart failure" / "CHF" is Edema and, when not negated, also Cardiomegaly -1.
- Scarring counts as Lung Opacity (CheXpert lists "scar"); pleural thickening and pleural scars are Pleural
  Other. Sternotomy wires and surgical clips are Support Devices (ours; CheXpert lists hardware, not wires).

:func:`clinical_f1` binarises labels (1, and -1 when ``uncertain_as=1``, are positive; 0, None and -1 when
``uncertain_as=0`` are negative) and scores every observation. Micro F1 pools all 14 observations. Macro F1
averages the observations that are positive in at least one prediction or reference, so observations absent
from a test set do not add zeros (scikit-learn's ``f1_score(average="macro", zero_division=0)`` restricted to
those columns gives the same number).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmed_rag.errors import MMedRAGError

OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NEGATION_WINDOW = 10  # words between a cue and a mention: "no pneumonia, effusions, edema, ..., nodules or masses"

Label = int | None

MENTION_PATTERNS: dict[str, str] = {
    "Enlarged Cardiomediastinum": r"widened mediastinum|mediastinal widening|cardiomediastinal enlargement",
    "Cardiomegaly": r"cardiomegaly|(?:cardiac|heart) enlargement|enlargement of the (?:heart|cardiac silhouette)",
    "Lung Opacity": (
        r"opaci\w*|infiltrat\w*|densit(?:y|ies)|air[- ]?space (?:disease|process)|interstitial (?:marking|pattern|"
        r"opacit|prominence)\w*|reticula\w*|scar(?:s|ring)?|peribronchial (?:thickening|cuffing)"
    ),
    "Lung Lesion": (
        r"nodul(?:e|es|ar opacit\w*|ar densit\w*)|mass(?:es)?|lesions?|tumou?rs?|neoplasms?|carcinomas?|lump"
    ),
    "Edema": r"edema|heart failure|chf|(?:vascular|pulmonary|venous) congestion|vascular indistinctness|kerley",
    "Consolidation": r"consolidat\w*",
    "Pneumonia": r"(?:broncho)?pneumonia|infections?|infectious(?: process)?",
    "Atelectasis": r"atelecta\w*|collapsed?",
    "Pneumothorax": r"pneumothora(?:x|ces)|hydropneumothorax",
    "Pleural Effusion": r"effusions?|pleural fluid|hydropneumothorax",
    "Pleural Other": (
        r"pleural (?:thickening|scar\w*|plaques?)|pleuro-?parenchymal (?:thickening|scar\w*)|fibrothorax|fibrosis"
    ),
    "Fracture": r"fractur\w*|fx",
    "Support Devices": (
        r"pacemaker|pacer|aicd|icd|defibrillator|picc|catheters?|mediport|port-a-cath|(?:endotracheal|tracheostomy|"
        r"nasogastric|orogastric|feeding|chest|et|ng|og|dobhoff) tubes?|(?:central venous|central|venous|arterial|"
        r"swan-ganz) (?:line|catheter)s?|(?:sternotomy|sternal|surgical|cerclage) wires?|surgical clips?|"
        r"hardware|stents?|(?:prosthetic|replacement) valves?|valve replacement|drains?|devices?|coils?|"
        r"(?:monitor|pacer|pacemaker|pacing|ecg|ekg) leads"
    ),
}
EXCLUSION_PATTERNS: dict[str, str] = {
    "Lung Opacity": r"pleural scar\w*|pleuro-?parenchymal scar\w*|(?:bone|soft tissue|osseous|breast) densit\w*",
    "Lung Lesion": r"calcified (?:nodul|granulom)\w*|(?:lytic|sclerotic|blastic|bony|bone|osseous|skin) lesions?",
    "Pleural Effusion": r"pericardial effusions?",
    "Atelectasis": r"(?:vertebral|compression|body) collapse",
}
ANATOMY_PATTERNS: dict[str, str] = {
    "Cardiomegaly": (
        r"heart(?: size)?|cardiac (?:size|silhouettes?|contours?|shadow|borders?)|cardiac(?= and mediastin)"
    ),
    "Enlarged Cardiomediastinum": (
        r"cardio-? ?mediastinal(?: silhouettes?| contours?)?|(?:superior )?mediastinum|"
        r"mediastinal (?:silhouettes?|contours?|width)"
    ),
}
# Anatomy that shows a normal Cardiomegaly when normal but stays Enlarged Cardiomediastinum alone when enlarged.
_NORMAL_ONLY_ANATOMY = {"Cardiomegaly": r"cardio-? ?mediastinal(?: silhouettes?| contours?)?"}
OTHER_FINDING_PATTERN = (
    r"emphysema\w*|copd|hyperinflat\w*|hyperexpan\w*|granulom\w*|calcifi\w*|degenerat\w*|spondylosis|scoliosis|"
    r"kyphosis|osteopenia|osteophyt\w*|hernia|atheroscler\w*|blunt\w*|eventration|elevat\w*|bullae|bullous|"
    r"metasta\w*|pneumomediastinum|pneumoperitoneum|deformit\w*|volume loss|hematoma|hemorrhage|aspiration|"
    r"bronchiectasis|bronchitis|cephalization|adenopathy|lymphadenopathy"
)

_PSEUDO_NEGATION = re.compile(
    r"\bno (?:significant |interval |definite |appreciable |substantial )?(?:change|increase|decrease|worsening)\b|"
    r"\bnot only\b|\bnot necessarily\b|\bwithout (?:interval )?change\b"
)
_PRE_NEGATION_UNCERTAIN = re.compile(
    r"\b(?:cannot|can ?not|could not|not|difficult to) (?:be )?(?:exclude|excluded|ruled? out)\b|\bnot excluded\b"
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|nor|neither|negative for|free of|clear of|absence of|resolution of|resolved|"
    r"removal of|rule out|ruled out|rules out|interval resolution of|history of)\b"
)
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were|has been|have been) )?(?:not|no longer) (?:seen|identified|visualized|visible|"
    r"present|demonstrated|evident|appreciated|noted|detected|enlarged)\b|\b(?:is |are )?absent\b|"
    r"\b(?:has |have )?(?:resolved|cleared)\b|\b(?:has been |have been )?removed\b|\bruled out\b|"
    r"\b(?:is|are|appears?|remains?)(?: \w+)? (?:normal|unremarkable|within normal limits)\b"
)
_ADJACENT_NORMAL = re.compile(r"\b(?:normal|unremarkable)(?:[ -]\w+)?\s+$")
_UNCERTAIN = re.compile(
    r"\b(?:may|might|could|possibl[ey]|possibility|probabl[ey]|likely|unlikely|questionabl[ey]|question of|"
    r"suspect\w*|suspicious|concern(?:ing)? for|worrisome|suggest\w*|equivocal|indeterminate|borderline|versus|vs|"
    r"differential|consider\w*|presumed|presumably|cannot exclude|not excluded|cannot be excluded|"
    r"cannot be ruled out|can not be excluded|atypical|evaluat\w* for|assess\w* for)\b|\?"
)
_TERMINATION = re.compile(
    r"\b(?:but|however|although|though|except|which|whereas|while|otherwise|apart from|aside from|with|"
    r"there (?:is|are|has been|have been)|and (?:the|there))\b"
)
_AND = re.compile(r"\band\b")
_LIST_CONTINUES = re.compile(r"\b(?:or|nor)\b")
_OWN_STATEMENT = re.compile(
    r"\b(?:small|large|mild|mildly|moderate|severe|minimal|trace|tiny|right|left|bilateral|bibasilar|biapical|new|"
    r"persistent|stable|residual|increased|worsening|is|are|a|an)\b"
)
_NORMAL_PREDICATE = re.compile(
    r"\b(?:normal|unremarkable|within (?:the )?normal limits|limits of normal|top normal|not (?:enlarged|widened|"
    r"increased)|negative)\b"
)
_ABNORMAL_PREDICATE = re.compile(
    r"\b(?:enlarg\w*|increased|widen\w*|prominen\w*|globular|(?:is|are|remains?|appears?)(?: \w+)? large)\b"
)
_ADJACENT_PREDICATE = re.compile(
    r"\b(?P<word>normal|unremarkable|enlarged|increased|widened|prominent|large|globular)(?:[ -]\w+)?\s+$"
)
_SENTENCE_END = re.compile(r"(?<=[.;!?])\s+|\n+")
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|\?")


def _compile(patterns: Mapping[str, str]) -> dict[str, re.Pattern]:
    return {name: re.compile(rf"\b(?:{pattern})\b") for name, pattern in patterns.items()}


_MENTIONS = _compile(MENTION_PATTERNS)
_EXCLUSIONS = _compile(EXCLUSION_PATTERNS)
_ANATOMY = _compile(ANATOMY_PATTERNS)
_NORMAL_ONLY = _compile(_NORMAL_ONLY_ANATOMY)
_OTHER_FINDING = re.compile(rf"\b(?:{OTHER_FINDING_PATTERN})\b")


class LabelInputError(MMedRAGError, ValueError):
    """Reports or labels that cannot be labelled or scored."""


@dataclass(frozen=True)
class _Sentence:
    """One lower-cased sentence, the same with pseudo-negations blanked (for cue search), and its word starts."""

    text: str
    cues: str
    words: list[int]

    @classmethod
    def of(cls, text: str) -> _Sentence:
        cues = _PSEUDO_NEGATION.sub(lambda m: " " * len(m.group()), text)
        return cls(text, cues, [m.start() for m in _WORD.finditer(text)])

    def window_start(self, position: int) -> int:
        """Where the NEGATION_WINDOW words before ``position`` begin."""
        before = [start for start in self.words if start < position]
        return before[-NEGATION_WINDOW - 1] if len(before) > NEGATION_WINDOW else 0

    def window_end(self, position: int) -> int:
        after = [start for start in self.words if start >= position]
        return after[NEGATION_WINDOW] if len(after) > NEGATION_WINDOW else len(self.text)

    def before(self, start: int) -> str:
        """The cue text in scope before a mention: the window, cut after the last scope terminator."""
        scope = self.cues[self.window_start(start) : start]
        ends = [m.end() for m in _TERMINATION.finditer(scope)]
        return scope[ends[-1] :] if ends else scope

    def after(self, end: int) -> str:
        """The cue text in scope after a mention: the window, cut at the first scope terminator."""
        scope = self.cues[end : self.window_end(end)]
        stop = _TERMINATION.search(scope)
        return scope[: stop.start()] if stop else scope


def _applies(before: str, cue: re.Pattern, after: str) -> bool:
    """Whether a cue in the text before a mention reaches it. A comma between them stops it unless the list goes
    on with "or"/"nor" (before or after the mention: "no a, b, or c" reaches b and c) or the item after the last
    comma has no size, side or state word of its own ("no a, b, c"); "no a, small b" does not reach b."""
    for match in cue.finditer(before):
        between = before[match.end() :]
        if "," not in between or _LIST_CONTINUES.search(between + after):
            return True
        if not _OWN_STATEMENT.search(between.rsplit(",", 1)[1]):
            return True
    return False


def _classify(sentence: _Sentence, start: int, end: int, inner: tuple[int, int] | None = None) -> int:
    """1, 0 or -1 for the mention at ``sentence.text[start:end]``; ``inner`` spans cue text inside the mention
    ("is possibly" in "heart is possibly enlarged")."""
    before, after = sentence.before(start), sentence.after(end)
    inside = sentence.cues[inner[0] : inner[1]] if inner else ""
    # After the mention a comma ends the scope unless it is a list: "effusion, possibly loculated" is not uncertain.
    near_after = after if "," not in after or _LIST_CONTINUES.search(after) else after.split(",")[0]
    # "Fracture and probable fracture": a hedge after "and" belongs to the next item, a negation may not ("effusion
    # and pneumothorax are not seen").
    near = f"{inside} {_AND.split(near_after)[0]}"
    if _applies(before, _PRE_NEGATION_UNCERTAIN, after) or _PRE_NEGATION_UNCERTAIN.search(near):
        return -1
    if (
        _applies(before, _PRE_NEGATION, after)
        or _PRE_NEGATION.search(inside)
        or _POST_NEGATION.search(near_after)
        or _ADJACENT_NORMAL.search(sentence.cues[:start])
    ):
        return 0
    if _applies(before, _UNCERTAIN, after) or _UNCERTAIN.search(near):
        return -1
    return 1


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in others)


def _anatomy_labels(sentence: _Sentence, name: str) -> list[int]:
    """Labels from anatomy + predicate ("heart size is normal", "enlarged cardiac silhouette")."""
    labels = []
    normal_only = _NORMAL_ONLY.get(name)
    matches = [*_ANATOMY[name].finditer(sentence.text), *(normal_only.finditer(sentence.text) if normal_only else [])]
    for match in matches:
        adjacent = _ADJACENT_PREDICATE.search(sentence.text[: match.start()])
        scope_end = sentence.window_end(match.end())
        stop = _TERMINATION.search(sentence.text, match.end(), scope_end)
        scope = sentence.text[match.end() : stop.start() if stop else scope_end]
        normal, abnormal = _NORMAL_PREDICATE.search(scope), _ABNORMAL_PREDICATE.search(scope)
        if adjacent is not None:
            is_normal = adjacent.group("word") in ("normal", "unremarkable")
            predicate_end, inner = match.end(), None
        elif normal is None and abnormal is None:
            continue
        else:
            is_normal = abnormal is None or (normal is not None and normal.start() <= abnormal.start())
            predicate = normal if is_normal else abnormal
            predicate_end = match.end() + predicate.end()
            inner = (match.end(), match.end() + predicate.start())
        if is_normal:
            labels.append(0)
        elif normal_only is None or not normal_only.fullmatch(match.group()):
            start = adjacent.start() if adjacent is not None else match.start()
            labels.append(_classify(sentence, start, predicate_end, inner=inner))
    return labels


def _aggregate(labels: list[int]) -> Label:
    """CheXpert's rule for several mentions: positive over uncertain over negative."""
    if not labels:
        return None
    return 1 if 1 in labels else (-1 if -1 in labels else 0)


def label_report(text: str) -> dict[str, Label]:
    """CheXpert-style labels of one report: ``{observation: 1 | 0 | -1 | None}`` for all of :data:`OBSERVATIONS`."""
    if not isinstance(text, str):
        raise LabelInputError(f"report is {type(text).__name__}, expected a str")
    found: dict[str, list[int]] = {name: [] for name in OBSERVATIONS}
    other_findings: list[int] = []
    for raw in _SENTENCE_END.split(text.lower()):
        sentence = _Sentence.of(" ".join(raw.split()))
        if not sentence.words:
            continue
        for name, pattern in _MENTIONS.items():
            excluded = [m.span() for m in _EXCLUSIONS[name].finditer(sentence.text)] if name in _EXCLUSIONS else []
            for match in pattern.finditer(sentence.text):
                if not _overlaps(match.span(), excluded):
                    found[name].append(_classify(sentence, *match.span()))
                    if name == "Edema" and match.group() in ("heart failure", "chf") and found[name][-1] != 0:
                        found["Cardiomegaly"].append(-1)
        for name in _ANATOMY:
            found[name].extend(_anatomy_labels(sentence, name))
        other_findings.extend(_classify(sentence, *m.span()) for m in _OTHER_FINDING.finditer(sentence.text))
    labels = {name: _aggregate(found[name]) for name in OBSERVATIONS}
    if not text.strip():
        return labels
    findings = [labels[name] for name in OBSERVATIONS if name not in ("No Finding", "Support Devices")]
    if not any(label in (1, -1) for label in [*findings, *other_findings]):
        labels["No Finding"] = 1
    return labels


def _binary(labels: Sequence[Mapping[str, Label]], uncertain_as: int) -> np.ndarray:
    positive = {1, -1} if uncertain_as == 1 else {1}
    return np.array([[row.get(name) in positive for name in OBSERVATIONS] for row in labels], dtype=bool)


def _labels_of(reports: Sequence[str | Mapping[str, Label]], role: str) -> list[Mapping[str, Label]]:
    """Labels of each report; NaN counts as None, as in the CheXpert labeler's CSV output."""
    labelled = []
    for position, report in enumerate(reports):
        if isinstance(report, str):
            labelled.append(label_report(report))
        elif isinstance(report, Mapping):
            report = {name: None if value != value else value for name, value in report.items()}
            unknown = set(report) - set(OBSERVATIONS)
            bad = {name: value for name, value in report.items() if value not in (1, 0, -1, None)}
            if unknown or bad:
                raise LabelInputError(
                    f"{role} {position}: unknown observations {sorted(unknown)} or labels {bad} "
                    f"(expected names from OBSERVATIONS and labels 1, 0, -1 or None)"
                )
            labelled.append(report)
        else:
            raise LabelInputError(f"{role} {position} is {type(report).__name__}, expected report text or labels")
    return labelled


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 with 0 where undefined (scikit-learn's ``zero_division=0``)."""
    precision = float(tp / (tp + fp)) if tp + fp else 0.0
    recall = float(tp / (tp + fn)) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def clinical_f1(
    predictions: Sequence[str | Mapping[str, Label]],
    references: Sequence[str | Mapping[str, Label]],
    uncertain_as: int = 1,
) -> dict:
    """Per-observation precision/recall/F1/support and micro/macro F1 of generated against reference reports.

    Each item is report text (labelled with :func:`label_report`) or labels already made. Returns
    ``{"per_observation": {name: {"precision", "recall", "f1", "support", "predicted"}}, "micro": {"precision",
    "recall", "f1"}, "macro_f1", "macro_observations", "examples", "uncertain_as"}``; support counts reference
    positives, predicted counts predicted positives.
    """
    if uncertain_as not in (0, 1):
        raise LabelInputError(f"uncertain_as must be 1 (uncertain counts as positive) or 0, got {uncertain_as!r}")
    if isinstance(predictions, str) or isinstance(references, str):
        raise LabelInputError("predictions and references must be sequences of reports, not one str")
    if len(predictions) != len(references):
        raise LabelInputError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise LabelInputError("no reports to score")
    predicted = _binary(_labels_of(predictions, "prediction"), uncertain_as)
    gold = _binary(_labels_of(references, "reference"), uncertain_as)
    tp = (predicted & gold).sum(0)
    fp = (predicted & ~gold).sum(0)
    fn = (~predicted & gold).sum(0)
    per_observation = {}
    for j, name in enumerate(OBSERVATIONS):
        precision, recall, f1 = _f1(tp[j], fp[j], fn[j])
        per_observation[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(gold[:, j].sum()),
            "predicted": int(predicted[:, j].sum()),
        }
    micro_precision, micro_recall, micro_f1 = _f1(tp.sum(), fp.sum(), fn.sum())
    present = [name for j, name in enumerate(OBSERVATIONS) if predicted[:, j].any() or gold[:, j].any()]
    macro = float(np.mean([per_observation[name]["f1"] for name in present])) if present else 0.0
    return {
        "per_observation": per_observation,
        "micro": {"precision": micro_precision, "recall": micro_recall, "f1": micro_f1},
        "macro_f1": macro,
        "macro_observations": present,
        "examples": len(predictions),
        "uncertain_as": uncertain_as,
    }
