"""Captioning metrics in pure Python, as the COCO caption toolkit (pycocoevalcap) computes them: its tokenisation
(``coco_tokenize``), corpus BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015; pycocoevalcap's
``Cider``, which clips and length-penalises, i.e. CIDEr-D). tests/test_caption_metrics.py compares them with it."""

import math
import re
from collections import Counter

# ----------------------------------------------------------------------------------------------- COCO tokenisation
# pycocoevalcap's PTBTokenizer runs Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase) on the captions
# joined by newlines, then drops the tokens in PUNCTUATIONS (case-sensitively, after lower-casing: "-lrb-" stays).
# Below, a subset of its lexer (PTBLexer.flex): at each position the longest match of any rule wins, the earlier rule
# on a tie; a rule's trailing context (after the group "tok") counts in the length but is not consumed, as in JFlex.
_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                 ";"}
_APOS = "['\u0092\u2019]"
_APOS_IN = "['\u0092\u2019\u0091\u2018\u201b]"  # apostrophes also accepted inside words
# a letter / a letter or digit, as Java's [:letter:] / [:digit:] (Python's \w also takes superscripts and fractions)
_NOT_LETTER = "\\W\\d_\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff"
_L, _LD = f"[^{_NOT_LETTER}]", f"(?:[^{_NOT_LETTER}]|\\d)"
_REDAUX = f"{_APOS}(?i:[msd]|re|ve|ll)"
_THING_PART = f"(?:[dDoOlL]{_APOS_IN}{_LD})?{_LD}+"  # o'clock, d'art
_THING = f"{_THING_PART}(?:[-_\u058a\u2010\u2011]{_THING_PART})*"
_ACRO = "[A-Za-z](?:\\.[A-Za-z])+"
_HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_ACRO}\\.))+"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
_SPACENL = f"(?:{_SPACE}|[\r\n\u2028\u2029\u000b\u000c\u0085])"


def _caseless_after_first(words: str) -> str:
    """``"The A"`` -> ``"T(?i:he)|A"``: PTBLexer's ``[T]he`` (a character class keeps its case in a caseless lexer)."""
    return "|".join(w[0] + (f"(?i:{re.escape(w[1:])})" if len(w) > 1 else "") for w in words.split())


# abbreviations that keep their period (the list CoreNLP 3.4.1 keeps, checked against it); "No." only before a digit.
# Where one alternative is a prefix of another ("ph", "ph.d") the longer comes first: Python's | takes the first fit.
_ABBREV = ("(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz|calif|colo|conn"
           "|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo|inc|cos?|corp|pp?tys?"
           "|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|invt|elec|natl|m[ft]g|(?:ed|ph)\\.d|ph|tel|est|ext|sq|ft|jr|sr|bros"
           "|blvd|rd|esq|etc|al|seq|mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm"
           "|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|vs|alex|wm|jos|cie"
           "|a\\.k\\.a|cf|treas|[a-z])|" + _caseless_after_first("Ark Del Ill La Mass Miss Ore Pa Tex Wash") + ")\\.")
# a single letter's period is a sentence end before these words (CoreNLP's rule for acronyms before "The", ...)
_SENTENCE_START = _caseless_after_first(
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More Mr. Ms. Now"
    " Once One Other Our She Since So Some Such That The Their Then There These They This We When While What Yet You")
_QUOTE_MAP = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0092": "'", "\u2019": "'",
                            "\u203a": "'", "\u0093": "``", "\u201c": "``", "\u00ab": "``", "\u0094": "''",
                            "\u201d": "''", "\u00bb": "''", '"': "''"})
_CURRENCY = str.maketrans({"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$",
                           "\u20ac": "$"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


# (pattern, output): output None keeps the matched text, a str replaces it, a function maps it; "" emits nothing
_RULES = [(re.compile(p, flags), out) for p, out, flags in [
    ("(?P<tok>can(?=not)|gon(?=na)|got(?=ta)|wan(?=na)|lem(?=me)|gim(?=me)|'t(?=is|was))(?:not|na|ta|me|is|was)", None,
     re.I),  # "cannot" -> "can not", "gonna" -> "gon na", "'tis" -> "'t is"
    ("<\\/?[A-Za-z!][^>]*>", None, 0),  # SGML
    ("[\u0096\u0097\u2013\u2014\u2015]", "--", 0),
    (f"(?P<tok>{_L}+){_REDAUX}", None, 0),  # the word before 's 'm 'd 're 've 'll
    (f"(?P<tok>[A-Za-z]*[A-MO-Za-mo-z])[nN]{_APOS_IN}[tT]", None, 0),  # "do" of "don't"
    (f"{_L}+", None, 0),
    (f"{_APOS}(?:[nN]{_APOS}?|(?i:em|cause|till?)|[2-9]0[sS])|[lLdDjJ]{_APOS}|[A-HJ-XZn]{_APOS_IN}{_L}{{2,}}"
     f"|{_L}+[aeiouyAEIOUY]{_APOS_IN}[aeiouA-Z]{_L}*", None, 0),  # "'n'", "'em", "'90s", "O'Brien", "ma'am"
    (f"(?P<tok>[yY]{_APOS}){_L}", None, 0),  # "y'" of "y'all"
    ('https?:\\/\\/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-]', None, 0),
    ('(?:www\\.(?:[^ \t\n\f\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}'
     '|(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\\.)+(?:com|net|org|edu))(?:'
     '\\/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?', None, 0),  # likely URLs
    ('[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0]*@(?:[^ \t\n\f\r"<>|().\u00a0]+\\.)*[^ \t\n\f\r"<>|().\u00a0]+', None,
     0),  # e-mail addresses and anything else glued around an "@"
    (f"(?P<tok>{_REDAUX})[^A-Za-z]", lambda t: t.translate(_QUOTE_MAP), 0),
    (f"[nN]{_APOS_IN}[tT]", lambda t: t.translate(_QUOTE_MAP), 0),
    ("\\d{1,2}[-/]\\d{1,2}[-/]\\d{2,4}", None, 0),  # dates
    ("[-+]?(?:\\d*(?:[.:,\u00ad\u066b\u066c]\\d+)+|\\d+)", lambda t: t.replace("\u00ad", ""), 0),  # numbers
    ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None, 0),  # "²"
    ("(?:\\d{1,4}[- \u00a0])?\\d{1,4}(?:\\\\?/|\u2044)\\d{1,4}", lambda t: t.replace(" ", "\u00a0"), 0),  # fractions
    ("[\u00bc\u00bd\u00be]", lambda t: {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4"}[t], 0),
    ("[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?\\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, 0),  # "and/or"
    ("[A-Z]*\\$|#", None, 0),
    ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
     lambda t: t.translate(_CURRENCY), 0),
    (f"(?P<tok>[A-Za-z])\\.{_SPACENL}+(?:{_SENTENCE_START}){_SPACENL}", None, 0),  # "b. The": "b" then "."
    (f"{_ACRO}\\.|{_ABBREV}", None, 0),  # "u.s.", "mr.", "etc.", "b."
    (f"(?P<tok>(?i:nos?|prop)\\.){_SPACE}*\\d", None, 0),  # "no. 5"
    (f"(?P<tok>{_ACRO}){_SPACENL}", None, 0),
    (f"(?P<tok>{_APOS}\\d\\d){_SPACENL}", None, 0),  # "'90"
    (f"{_L}{_LD}*(?:\\.{_L}{_LD}*)+", None, 0),  # "dog.cat" (a missing space) stays one token
    (f"(?P<tok>{_L}+\\.)[,;:]", None, 0),  # "dog.," -> "dog." ","
    ("(?:\\(\\d{3}\\)[ \u00a0]?|\\d{3}[- \u00a0.])\\d{3}[- \u00a0.]\\d{4}", lambda t: _parens(t.replace(" ", "\u00a0")),
     0),  # phone numbers
    ("(?P<tok>[<>]?[:;=][-o*']?[()\\[\\]{|@\\\\DPdpO])[^A-Za-z0-9]", _parens, 0),  # smileys: ":)" -> ":-rrb-"
    ('"', "''", 0),  # `` or '': dropped either way
    ("[+%&\u2030\u2031~^|\\\\=/<>]", None, 0),
    ("[()\\[\\]{}]", _BRACKETS.get, 0),
    ("-+", lambda t: "--" if len(t) in (3, 4) else t, 0),
    ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", "...", 0),
    (f"[@#]{_L}+|@+|#+|_+|\\*+", None, 0),  # "#tag", "@user", footnote marks
    ("[,;:.\u00a1\u00bf]|[?!]+", None, 0),  # "?!" and "!!" are tokens that survive
    (f"(?P<tok>{_HTHING}\\.)[,;:]|{_HTHING}", None, 0),  # "3.5-inch", "u.s.-based"
    (f"(?P<tok>{_THING}\\.)[,;:]|{_THING}", None, 0),  # "x-ray", "20-year-old", "1st"
    ("[A-Z]+(?:[+&][A-Z]+)+", None, 0),  # "AT&T"
    ("(?P<tok>')[A-Za-z][^ \t\n\r\u00a0]", "`", 0),
    (_REDAUX, lambda t: t.translate(_QUOTE_MAP), 0),
    ("''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}|'",
     lambda t: t.translate(_QUOTE_MAP), 0),
    ("[\u00a6-\u00a9\u00ac\u00ae-\u00b1\u00b4-\u00b8\u00ba\u00d7\u00f7\u2020-\u2023\u2032-\u2038\u2044\u2100-\u214f"
     "\u2190-\u23ff\u2600-\u26ff]", None, 0),  # symbols that stand alone
    (f"{_SPACENL}+|[\u200b\u200e\u200f\ufeff]", "", 0),
]]
_PLAIN_WORD = re.compile("[A-Za-z]+(?=[ \n])")  # the common case, which no rule splits or extends
_ASSIMILATED = {"cannot", "gonna", "gotta", "wanna", "lemme", "gimme"}


def coco_tokenize(caption: str) -> list[str]:
    """A caption's tokens as pycocoevalcap's ``PTBTokenizer`` gives them to its scorers: CoreNLP's PTB tokenisation,
    lower-cased, without the punctuation tokens.

    Reproduced, checked against the Java tokenizer (tests/test_caption_metrics.py): white space of any kind,
    lower-casing; periods, commas, colons, semicolons, ``?`` and ``!`` split off and dropped (runs such as ``?!``
    stay); clitics (``'s 'm 'd 're 've 'll n't``, so "don't" -> "do n't", "can't" -> "ca n't") and "cannot" -> "can
    not", "gonna" -> "gon na"; quotes (ASCII, curly, guillemets) dropped, a plural possessive's ``'`` too; hyphenated
    words, numbers with commas, decimals, times, dates and fractions, "1st", "3.5-inch", "and/or" kept whole; ellipses
    and dashes (``-``, ``--``, en and em dashes) dropped; parentheses and brackets become the kept tokens ``-lrb-
    -rrb- -lsb- -rsb- -lcb- -rcb-`` (PUNCTUATIONS lists them upper-case, so lower-casing keeps them); abbreviations
    that keep their period ("mr.", "st.", "etc.", single letters, "u.s."); ``$ % & # @`` split off, ``#tag`` and
    ``@user`` whole; URLs and e-mail addresses; "dog.cat" (a missing space) kept whole; smileys; British spellings
    kept (3.4.1 does not americanize).

    Not covered: HTML entities (``&amp;`` gives "& amp", not "&"), the rest of CoreNLP's abbreviation and
    apostrophe-word lists and its special words ("c++"), phone numbers written with dots, and a few glued forms
    ("etc.a" stays whole). One case cannot be reproduced per caption: the toolkit tokenises all captions as one file,
    so a caption ending in a single letter and a period ("plan b.") keeps "b." unless the next caption in that file
    starts with "A", "The", ... (then "b")."""
    text, tokens, pos = caption.replace("\n", " ") + "\n", [], 0  # "\n": the line break after it in that file
    while pos < len(text):
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group().lower() not in _ASSIMILATED:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best = None
        for pattern, out in _RULES:
            m = pattern.match(text, pos)
            if m and (best is None or m.end() > best[0].end()):
                best = m, out
        if best is None:  # a character no rule knows: CoreNLP deletes it
            pos += 1
            continue
        m, out = best
        end = m.end("tok") if "tok" in m.re.groupindex and m.group("tok") is not None else m.end()
        raw = text[pos:end]
        tokens.append(raw if out is None else out if isinstance(out, str) else out(raw))
        pos = end
    # the toolkit splits CoreNLP's lines on " " to drop punctuation, its scorers split on any white space
    return [w for t in tokens for piece in t.lower().split(" ") if piece not in _PUNCTUATIONS for w in piece.split()]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _all_ngrams(tokens: list[str], n: int) -> Counter:
    """Counts of every 1..n-gram of ``tokens``, in pycocoevalcap's ``precook`` order (by order, then position)."""
    counts = Counter()
    for k in range(1, n + 1):
        counts.update(_ngrams(tokens, k))
    return counts


def corpus_bleu_scores(hypotheses: list[list[str]], references: list[list[list[str]]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as pycocoevalcap's ``BleuScorer.compute_score(option="closest")`` computes it.

    Clipped n-gram matches (against each n-gram's largest count in one reference) and hypothesis n-gram counts are
    summed over the corpus; BLEU-k is ``prod_{j<=k} (matches_j + 1e-15) / (total_j + 1e-9)`` to the power ``1/k``, so
    an order without a match gives a tiny positive score, not 0. The reference length of an image is the reference
    length closest to its hypothesis' (the shorter on a tie); with ``ratio = (c + 1e-15) / (r + 1e-9)`` for the summed
    hypothesis and reference lengths, every score is multiplied by ``exp(1 - 1 / ratio)`` when ``ratio < 1``."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference")
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's: no division by 0, and 0 matches give a tiny factor, not 0
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        max_counts = Counter()
        for ref in refs:
            max_counts |= _all_ngrams(ref, max_n)
        for g, count in _all_ngrams(hyp, max_n).items():
            correct[len(g) - 1] += min(max_counts[g], count)
        for k in range(max_n):
            guess[k] += max(0, len(hyp) - k)
    scores, product = [], 1.0
    for k in range(max_n):  # the same operations in the same order as BleuScorer: bit-identical scores
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def corpus_bleu(hypotheses: list[list[str]], references: list[list[list[str]]], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n``, the last of ``corpus_bleu_scores``: COCO's smoothed score (until issue 18 it was 0.0
    whenever some order had no match)."""
    return corpus_bleu_scores(hypotheses, references, max_n)[-1]


def cider_scores(hypotheses: list[list[str]], references: list[list[list[str]]], n: int = 4,
                 sigma: float = 6.0) -> list[float]:
    """Per-image CIDEr-D, following pycocoevalcap's ``CiderScorer.compute_cider`` step for step.

    Document frequency ``df(g)`` is the number of images whose reference set contains n-gram ``g``; with ``N`` images
    a sentence's order-k vector is ``tf(g) * (log N - log max(1, df(g)))`` over its k-grams, and its "length" is its
    number of bigrams. Against each reference and order: ``sum_g min(h[g], r[g]) * r[g]``, divided by ``|h| * |r|``
    when both norms are non-zero, times ``exp(-(len_h - len_r)^2 / (2 sigma^2))``. An image scores 10 times the mean
    over orders, averaged over its references. The idf comes from the references of this corpus only, so a one-image
    corpus scores 0 (``log 1 = 0``)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference")
    if not references:
        return []
    cooked_refs = [[_all_ngrams(ref, n) for ref in refs] for refs in references]
    doc_freq = Counter()
    for refs in cooked_refs:
        doc_freq.update({g for ref in refs for g in ref})
    log_num_images = math.log(float(len(references)))

    def counts_to_vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, term_freq in counts.items():
            k = len(g) - 1
            vec[k][g] = weight = float(term_freq) * (log_num_images - math.log(max(1.0, doc_freq[g])))
            norm[k] += weight ** 2
            if k == 1:
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hypotheses, cooked_refs):
        vec_hyp, norm_hyp, len_hyp = counts_to_vec(_all_ngrams(hyp, n))
        per_order = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, len_ref = counts_to_vec(ref)
            # math.e ** x as the original's np.e ** x: bit-identical scores (math.exp can differ in the last bit)
            penalty = math.e ** (-(float(len_hyp - len_ref) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = 0.0
                for g, weight in vec_hyp[k].items():
                    ref_weight = vec_ref[k].get(g, 0.0)
                    val += min(weight, ref_weight) * ref_weight
                if norm_hyp[k] != 0 and norm_ref[k] != 0:
                    val /= norm_hyp[k] * norm_ref[k]
                per_order[k] += val * penalty
        scores.append(sum(per_order) / n / len(refs) * 10.0)
    return scores


def corpus_cider(hypotheses: list[list[str]], references: list[list[list[str]]], n: int = 4,
                 sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of ``cider_scores`` over the images (0.0 for an empty corpus)."""
    scores = cider_scores(hypotheses, references, n, sigma)
    return sum(scores) / len(scores) if scores else 0.0
