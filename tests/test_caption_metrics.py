"""train/metrics.py against the COCO caption toolkit: BLEU-1..4 by hand and against pycocoevalcap's Bleu(4), CIDEr-D
against its Cider() on a multi-reference corpus, and coco_tokenize against its PTBTokenizer (Stanford CoreNLP, java)."""

import math
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from condmoe.train.metrics import cider_scores, coco_tokenize, corpus_bleu, corpus_bleu_scores, corpus_cider

TINY, SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer: (matches + TINY) / (total + SMALL)


def _tok(sentences: list[str]) -> list[list[str]]:
    return [s.split() for s in sentences]


def _bleu(p: list[float], k: int) -> float:
    return math.prod(p[:k]) ** (1 / k)


def test_bleu_hand_computed_two_images_multi_reference():
    hyps = _tok(["the cat sat on the mat", "a dog runs"])
    refs = [_tok(["the cat is on the mat", "there is a cat on the mat"]), _tok(["a dog", "a dog runs fast"])]
    # Image 1 (6 words). 1-grams: the (twice, as in the first reference), cat, on, mat match, sat does not: 5/6.
    # 2-grams: "the cat", "on the", "the mat" match, "cat sat", "sat on" do not: 3/5. 3-grams: only "on the mat":
    # 1/4. 4-grams "the cat sat on", "cat sat on the", "sat on the mat": 0/3. Closest reference length: 6.
    # Image 2 (3 words): every n-gram is in "a dog runs fast": 3/3, 2/2, 1/1, and 0/0 4-grams. Reference lengths 2
    # and 4 are both 1 away: the shorter, 2, counts.
    # Corpus: matches 8, 5, 2, 0 of 9, 7, 5, 3; hypothesis length 9 > reference length 8: no brevity penalty.
    p = [(8 + TINY) / (9 + SMALL), (5 + TINY) / (7 + SMALL), (2 + TINY) / (5 + SMALL), (0 + TINY) / (3 + SMALL)]
    expected = [_bleu(p, k) for k in (1, 2, 3, 4)]
    assert corpus_bleu_scores(hyps, refs) == pytest.approx(expected, rel=1e-12)
    assert expected[:3] == pytest.approx([8 / 9, math.sqrt(8 / 9 * 5 / 7), (8 / 9 * 5 / 7 * 2 / 5) ** (1 / 3)])
    assert corpus_bleu(hyps, refs) == corpus_bleu_scores(hyps, refs)[3]
    assert corpus_bleu_scores(hyps, refs, max_n=2) == pytest.approx(expected[:2], rel=1e-12)


def test_bleu_hand_computed_with_brevity_penalty():
    hyps = _tok(["a red bus", "two dogs play in the snow"])
    refs = [_tok(["a red bus parked on the road", "a big red bus"]), _tok(["two dogs play in the snow"])]
    # Image 1 (3 words) vs reference lengths 7 and 4: closest 4. 1-grams 3/3, 2-grams 2/2, 3-grams 1/1, 0/0.
    # Image 2 is its reference (6 words): 6/6, 5/5, 4/4, 3/3. Corpus: 9/9, 7/7, 5/5, 3/3; c = 9, r = 10.
    p = [(9 + TINY) / (9 + SMALL), (7 + TINY) / (7 + SMALL), (5 + TINY) / (5 + SMALL), (3 + TINY) / (3 + SMALL)]
    ratio = (9 + TINY) / (10 + SMALL)
    expected = [_bleu(p, k) * math.exp(1 - 1 / ratio) for k in (1, 2, 3, 4)]
    assert corpus_bleu_scores(hyps, refs) == pytest.approx(expected, rel=1e-12)
    assert expected[3] == pytest.approx(math.exp(1 - 10 / 9))


def test_bleu_zero_matches_is_tiny_not_zero():
    # No n-gram in common. Totals 3, 2, 1, 0 (a 3-word hypothesis has no 4-gram): each factor is TINY / (total +
    # SMALL), so BLEU-4's 4-gram factor is TINY / SMALL. c = 3 < r = 4: brevity penalty exp(1 - 1 / ratio).
    scores = corpus_bleu_scores(_tok(["a b c"]), [_tok(["d e f g"])])
    penalty = math.exp(1 - 1 / ((3 + TINY) / (4 + SMALL)))
    p = [TINY / (3 + SMALL), TINY / (2 + SMALL), TINY / (1 + SMALL), TINY / (0 + SMALL)]
    product, expected = 1.0, []
    for k in range(4):  # the scorer's order of operations: the values are bit-identical
        product *= p[k]
        expected.append(product ** (1 / (k + 1)) * penalty)
    assert scores == expected
    assert all(s > 0 for s in scores)
    assert scores[0] == pytest.approx(1e-15 / 3 * math.exp(1 - 4 / 3), rel=1e-6)


def test_bleu_empty_hypothesis_scores_zero():
    # Every factor is TINY / SMALL, but c = 0 makes the brevity penalty exp(1 - (r + SMALL) / TINY) = 0.
    assert corpus_bleu_scores([[]], [_tok(["a dog runs"])]) == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("references, closest", [
    (["a b", "a b c d"], 2), (["a b c d", "a b"], 2),  # both 1 away from 3: the shorter
    (["a b c d", "x"], 4), (["x y", "a b c d e"], 2), (["x y z w", "a b c d e"], 4),
])
def test_bleu_closest_reference_length_and_its_tie_rule(references, closest):
    # The 3-word hypothesis "a b c" is inside one reference each time: 3/3, 2/2, 1/1 (BLEU-1..3); the reference
    # length is the one closest to 3, and only a closest length of 4 > 3 brings a brevity penalty.
    p = [(3 + TINY) / (3 + SMALL), (2 + TINY) / (2 + SMALL), (1 + TINY) / (1 + SMALL)]
    ratio = (3 + TINY) / (closest + SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores = corpus_bleu_scores(_tok(["a b c"]), [_tok(references)], max_n=3)
    assert scores == pytest.approx([_bleu(p, k) * penalty for k in (1, 2, 3)], rel=1e-12)
    assert (scores[0] < 0.9) == (closest == 4)


def test_bleu_rejects_bad_input():
    with pytest.raises(ValueError, match="reference sets"):
        corpus_bleu_scores(_tok(["a b"]), [])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu_scores(_tok(["a b"]), [[]])


# 20 images x 5 references in the style of COCO captions, and one model-style hypothesis each.
CORPUS = [
    ("a man riding a wave on top of a surfboard", [
        "A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A man on a surfboard riding a wave.", "Surfer in a black wet-suit catching a wave.",
        "A person surfing on a big, blue wave."]),
    ("a woman cutting a large white cake", [
        "A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.", "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife."]),
    ("a young boy holding an umbrella next to a cow", [
        "A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella next to a herd of "
        "cattle.", "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A young boy with an umbrella who is touching the horn of a cow.",
        "A boy holding an umbrella while standing next to livestock."]),
    ("a kitchen with a stove and a refrigerator", [
        "A kitchen with a stove, microwave and refrigerator.", "A refrigerator, oven and microwave sitting in a "
        "kitchen.", "The kitchenette uses small space to great efficiency.",
        "A kitchen with white cabinets, a stove and a fridge", "A kitchen with lots of cabinets and a small table."]),
    ("two giraffes standing next to each other", [
        "Two giraffes standing in a tree filled area.", "A couple of giraffe standing next to each other.",
        "Two giraffe standing next to each other in a field.", "Two giraffes in a field of trees, eating leaves.",
        "two giraffes standing in a field with trees  "]),
    ("a bathroom with a toilet and a sink", [
        "A bathroom with a toilet, sink, and shower.", "A white toilet sitting next to a sink in a bathroom.",
        "The bathroom is clean and ready to be used .", "A small bathroom with a toilet and a sink",
        "A very clean bathroom with a white toilet."]),
    ("a red stop sign on the side of a street", [
        "A stop sign on the corner of a street.", 'A red "STOP" sign at an intersection.',
        'A stop sign that says "stop" on it.', "a stop sign with graffiti that says 'eating animals' on it",
        "A STOP sign, with a sticker on it, near a street."]),
    ("a cat laying on top of a laptop", [
        "A cat laying on top of a laptop computer.", "A cat that is sitting on a laptop keyboard!",
        "The cat's paw is on the laptop's keyboard.", "An orange cat sleeping on a person's lap-top.",
        "A black and white cat lies on a desk next to a keyboard."]),
    ("a baseball player swinging a bat", [
        "A baseball player swinging a bat at a ball.", "A batter, catcher, and umpire during a baseball game.",
        "Baseball player at bat during a game in the 5th inning.",
        "A player in a #23 jersey is about to hit the ball.", "The Yankees' batter waits for the pitch."]),
    ("a plate of food with broccoli and rice", [
        "A plate of food with broccoli, carrots and rice.", "A white plate topped with meat and vegetables.",
        "Someone's dinner: steak, potatoes & green beans.", "A close-up of a plate of food.",
        "A half-eaten meal sits on a plate next to a cup of coffee."]),
    ("a train on the tracks", [
        "A train traveling down tracks next to a forest.", "A long, red train pulling into a train station.",
        "The train is at the station - waiting for passengers.", "An old steam train with smoke coming out of it.",
        "A Amtrak train on the tracks near a platform."]),
    ("a dog catching a frisbee in the air", [
        "A dog catching a frisbee in the air.", "A dog that is jumping up to catch a frisbee.",
        "A brown and white dog with a Frisbee in its mouth.", "The dog is running in the grass with a toy.",
        "A puppy isn't sure what to do with the frisbee."]),
    ("a large clock tower in a city", [
        "A clock tower in the middle of a town.", "A large clock on the side of a building reads 10:15.",
        "The clock on the tower says it's 3 o'clock.", "A tall tower with a clock at the top of it",
        "Big Ben in London, England at dusk."]),
    ("a herd of elephants walking in the grass", [
        "Some elephants walking through the grass.", "A herd of elephants walking across a dry grass field.",
        "Three elephants (two adults and a baby) walk together.", "An elephant is spraying water on itself...",
        "A mother elephant and her baby at the zoo."]),
    ("a woman playing tennis on a tennis court", [
        "A woman holding a tennis racquet on a tennis court.",
        "A tennis player is about to hit a ball with her racket.", "A woman in a white outfit plays tennis.",
        "A woman serving the ball during a tennis match at the U.S. Open.", "Venus Williams hits a forehand"]),
    ("a double decker bus on a city street", [
        "A bus driving down a city street.", "A double-decker bus parked on the side of the road.",
        "A red and white bus with the number 42 on it.", 'A city bus that says "Out of Service" on the front.',
        "A yellow school bus is parked near a curb"]),
    ("a pizza on a table", [
        "A pizza with cheese and pepperoni on a table.", "A large pizza cut into 8 slices.",
        "Someone is holding a slice of pizza in their hand.", "A pizza with mushrooms, olives, and peppers on it.",
        "A pepperoni pizza sitting on top of a wooden table."]),
    ("a living room with a couch and a television", [
        "a living room with a couch and a tv", "A living room filled with furniture and a flat screen TV.",
        "A cozy living room with a fire place.", 'The living room has hard-wood floors and a 50" TV.',
        "A couch, a coffee table, and a lamp in a room."]),
    ("people flying kites on the beach", [
        "People flying kites on a windy day at the beach.", "A kite flying high in the blue sky.",
        "A man is flying a kite in a field", "Several kites in the sky over a grassy park.",
        "A child flies a dragon-shaped kite."]),
    ("a street sign on a pole", [
        "A sign on the street says Main St.", 'The street sign reads "Broadway & 5th Ave."',
        "A sign for St. Mary's Hospital.", "A road sign pointing toward Mt. Rushmore.",
        "The corner of Hollywood Blvd. and Vine St."]),
]


@pytest.mark.parametrize("max_words", [None, 4])  # 4: short hypotheses, so the brevity penalty and no 4-gram matter
def test_bleu_and_cider_equal_pycocoevalcap(max_words):
    hyps = [coco_tokenize(h)[:max_words] for h, _ in CORPUS]
    refs = [[coco_tokenize(r) for r in rs] for _, rs in CORPUS]
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert corpus_bleu_scores(hyps, refs) == pytest.approx(coco_bleu, rel=1e-12)
    coco_cider, coco_per_image = Cider().compute_score(gts, res)
    assert cider_scores(hyps, refs) == pytest.approx(list(coco_per_image), rel=1e-12, abs=1e-15)
    assert corpus_cider(hyps, refs) == pytest.approx(coco_cider, rel=1e-12)
    assert 0.0 < corpus_bleu_scores(hyps, refs)[3] < 1.0


# (caption, its tokens): CoreNLP 3.4.1's output through pycocoevalcap, as test_coco_tokenize_matches_java checks.
# Order matters for the java check: a caption ending in "b." must not be followed by one starting with "The", "A", ...
TOKENIZER_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs aren't playing; they're sleeping!", "two dogs are n't playing they 're sleeping"),
    ("The cat's toy is on the man's bed .", "the cat 's toy is on the man 's bed"),
    ("I'm sure we'll go, you've seen it, he'd say: fine.", "i 'm sure we 'll go you 've seen it he 'd say fine"),
    ("Don't, can't, won't, shouldn't... DON'T", "do n't ca n't wo n't should n't do n't"),
    ("it cannot be, gonna wanna go", "it can not be gon na wan na go"),
    ("The dogs' tails and James' car", "the dogs tails and james car"),
    ("A well-known 20-year-old in a t-shirt, an x-ray", "a well-known 20-year-old in a t-shirt an x-ray"),
    ("3,000 people, 2.5 cars, 10:15 on 12/25/2010, -5 degrees", "3,000 people 2.5 cars 10:15 on 12/25/2010 -5 degrees"),
    ("a 1/2 cup and ½ more, 1st place, 3d tv, 1980's cars", "a 1/2 cup and 1/2 more 1st place 3d tv 1980 's cars"),
    ("A sign (red and white) says \"STOP\" here.", "a sign -lrb- red and white -rrb- says stop here"),
    ("a box [large] {red}, <b>bold</b>", "a box -lsb- large -rsb- -lcb- red -rcb- <b> bold </b>"),
    ("It's 'quoted' text `here' and ``this''", "it 's quoted text here and this"),
    ("Curly \u201csmart\u201d and \u2018single\u2019 quotes, it\u2019s a dog\u2019s life",
     "curly smart and single quotes it 's a dog 's life"),
    ("A  double   spaced\ncaption\twith tabs ", "a double spaced caption with tabs"),
    ("a hat - and a dog -- or a cat --- here, x\u2013y \u2014 z", "a hat and a dog or a cat here x y z"),
    ("Wait... really? ok. . . fine.... end\u2026", "wait really ok fine end"),
    ("What?! No way!!", "what ?! no way !!"),
    ("Mr. Smith and Dr. Who at St. Mary's, Main St. etc.", "mr. smith and dr. who at st. mary 's main st. etc."),
    ("A U.S. flag at 5 p.m. or a.m., no. 5 or No more.", "a u.s. flag at 5 p.m. or a.m. no. 5 or no more"),
    ("the letter b. The end", "the letter b the end"),
    ("vitamin c. and plan b.", "vitamin c. and plan b."),
    ("a man/woman and/or $5 at 50% off, AT&T & co", "a man/woman and/or $ 5 at 50 % off at&t & co"),
    ("rock 'n' roll at 3 o'clock, y'all, the '90s", "rock 'n' roll at 3 o'clock y' all the '90s"),
    ("www.example.com or http://example.com/page. #dogs @user #1", "www.example.com or http://example.com/page "
     "#dogs @user # 1"),
    ("A dog.A cat sat", "a dog.a cat sat"),
    ("\u00a35 and \u20ac10 for 5\u00b0", "# 5 and $ 10 for 5 \u00b0"),
    ("smiley :) and x\u00b2, a@b", "smiley :-rrb- and x \u00b2 a@b"),
    ("...", ""),
    ("", ""),
    ("a man in a U.S.-based 3.5-inch hat.", "a man in a u.s.-based 3.5-inch hat"),
]


@pytest.mark.parametrize("caption, expected", TOKENIZER_CASES)
def test_coco_tokenize(caption, expected):
    assert coco_tokenize(caption) == expected.split()


@pytest.mark.skipif(shutil.which("java") is None,
                    reason="java not found: pycocoevalcap's PTBTokenizer runs Stanford CoreNLP in java")
def test_coco_tokenize_matches_java():
    captions = {i: [{"caption": c}] for i, (c, _) in enumerate(TOKENIZER_CASES)}
    java = PTBTokenizer().tokenize(captions)  # one java run over all captions, as pycocoevalcap tokenises
    assert {i: coco_tokenize(c) for i, (c, _) in enumerate(TOKENIZER_CASES)} == {i: java[i][0].split() for i in java}
