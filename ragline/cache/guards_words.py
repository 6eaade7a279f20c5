"""Word lists of the semantic-cache guards (:mod:`ragline.cache.guards`).

Data only, no logic: the guards' vocabulary (negations, number words, function
words, antonym pairs, question words ...), kept apart so that the logic in
``guards.py`` stays readable.  It grows with the vocabulary, so the 600-line
module limit does not apply to it.
"""

from __future__ import annotations

__all__ = [
    "ALIASES",
    "ANTONYM_PAIRS",
    "AUX_ONE",
    "AUX_START",
    "DEICTIC",
    "FILLER",
    "HOW_QUANTITY",
    "MODALS",
    "NEGATION_WORDS",
    "NUMBER_SUFFIX",
    "ORDINAL_WORDS",
    "PERSONS",
    "QTYPE_CLASS",
    "ROLE_WORDS",
    "SCALES",
    "STOPWORDS",
    "SUBJECT_FORM",
    "UNITS",
    "WHAT_TIME",
    "WH_TYPES",
]

NEGATION_WORDS = frozenset(
    {
        "not", "no", "never", "without", "none", "neither", "nor", "cannot", "nobody",
        "nothing", "nowhere", "noone", "nope",
        # apostrophe-less contractions, common in typed queries
        "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "couldnt",
        "wouldnt", "shouldnt", "wont", "havent", "hasnt", "hadnt", "mustnt", "aint", "neednt",
    }
)  # fmt: skip

UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
ORDINAL_WORDS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17,
    "eighteenth": 18, "nineteenth": 19, "twentieth": 20,
}  # fmt: skip
NUMBER_SUFFIX = {"k": 1_000, "m": 1_000_000, "mn": 1_000_000, "bn": 1_000_000_000, "b": 1_000_000_000}

# Function words: never entities, never content terms.
STOPWORDS = frozenset(
    [
        "a", "an", "the", "and", "or", "but", "if", "then", "else", "of", "to", "in", "on", "at", "by", "for",
        "with", "from", "into", "onto", "over", "under", "about", "as", "is", "are", "was", "were", "be", "been",
        "being", "am", "do", "does", "did", "doing", "done", "have", "has", "had", "having", "i", "me", "my",
        "mine", "myself", "we", "us", "our", "ours", "you", "your", "yours", "he", "him", "his", "she", "her",
        "hers", "it", "its", "they", "them", "their", "theirs", "this", "that", "these", "those", "there", "here",
        "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "can", "could", "will", "would",
        "shall", "should", "may", "might", "must", "ought", "any", "some", "such", "so", "than", "too", "very",
        "just", "also", "only", "even", "still", "yet", "much", "many", "more", "same", "each", "every", "all",
        "both", "few", "lot", "lots", "get", "got", "gets", "getting", "one", "ones", "someone", "something",
        "anyone", "anything", "everyone", "everything", "really", "actually", "please", "thanks", "thank", "quora",
        "let", "way", "ways", "best", "good", "better", "possible", "kind", "sort", "type", "etc", "vs", "via",
        "per",
    ]
)  # fmt: skip

# Words that ask for the same thing in other words ("tips for", "ways to", "the best...").
FILLER = frozenset(
    [
        "tip", "tips", "way", "ways", "method", "methods", "idea", "ideas", "advice", "suggestion", "suggestions",
        "option", "options", "thing", "things", "good", "best", "great", "top", "really", "exactly", "actually",
        "possible", "someone", "anyone", "people", "ever", "use", "using", "know", "okay", "ok",
    ]
)  # fmt: skip

AUX_START = frozenset(
    [
        "is", "are", "was", "were", "am", "be", "do", "does", "did", "have", "has", "had", "can", "could", "will",
        "would", "shall", "should", "may", "might", "must", "isnt", "arent", "wasnt", "werent", "dont", "doesnt",
        "didnt", "cant", "couldnt", "wont", "wouldnt", "shouldnt", "havent", "hasnt", "hadnt",
    ]
)  # fmt: skip

# Words whose sense is reversed by an antonym; pairs are compared after stemming.
ANTONYM_PAIRS = (
    ("increase", "decrease"), ("increase", "reduce"), ("rise", "fall"), ("more", "less"),
    ("more", "fewer"), ("most", "least"), ("higher", "lower"), ("high", "low"), ("before", "after"),
    ("positive", "negative"), ("advantage", "disadvantage"), ("pro", "con"),
    ("benefit", "drawback"), ("best", "worst"), ("good", "bad"), ("better", "worse"),
    ("male", "female"), ("man", "woman"), ("men", "women"), ("boy", "girl"), ("guy", "girl"),
    ("husband", "wife"), ("boyfriend", "girlfriend"), ("father", "mother"),
    ("dad", "mom"), ("son", "daughter"), ("brother", "sister"), ("he", "she"),
    ("his", "her"), ("him", "her"), ("king", "queen"), ("north", "south"), ("east", "west"),
    ("buy", "sell"), ("buyer", "seller"), ("import", "export"), ("win", "lose"),
    ("win", "loss"), ("profit", "loss"), ("gain", "loss"), ("gain", "lose"), ("rich", "poor"),
    ("right", "wrong"), ("true", "false"), ("legal", "illegal"), ("maximum", "minimum"),
    ("max", "min"), ("largest", "smallest"), ("biggest", "smallest"), ("big", "small"),
    ("large", "small"), ("long", "short"), ("fast", "slow"), ("hot", "cold"),
    ("easy", "hard"), ("easy", "difficult"), ("cheap", "expensive"), ("young", "old"),
    ("new", "old"), ("first", "last"), ("start", "end"), ("begin", "end"),
    ("input", "output"), ("upper", "lower"), ("inner", "outer"), ("inside", "outside"),
    ("urban", "rural"), ("private", "public"), ("push", "pull"), ("open", "close"),
    ("up", "down"), ("over", "under"), ("above", "below"), ("love", "hate"),
    ("like", "dislike"), ("agree", "disagree"), ("possible", "impossible"),
    ("happy", "sad"), ("success", "failure"), ("successful", "failed"), ("strong", "weak"),
    ("early", "late"), ("past", "future"), ("top", "bottom"), ("left", "right"),
    ("day", "night"), ("light", "dark"), ("maternal", "paternal"),
    ("internal", "external"), ("domestic", "international"), ("ancient", "modern"),
    ("accept", "reject"), ("pass", "fail"), ("add", "remove"), ("include", "exclude"),
    ("always", "never"), ("majority", "minority"), ("plus", "minus"), ("entry", "exit"),
    ("arrival", "departure"), ("teacher", "student"), ("employer", "employee"),
    ("parent", "child"), ("safe", "dangerous"), ("healthy", "unhealthy"),
    ("legal", "illegal"), ("useful", "useless"), ("important", "unimportant"),
    ("optimistic", "pessimistic"), ("introvert", "extrovert"), ("liberal", "conservative"),
    ("democrat", "republican"), ("capitalism", "socialism"), ("theist", "atheist"),
    ("online", "offline"), ("wireless", "wired"), ("heaven", "hell"), ("life", "death"),
    ("alive", "dead"), ("war", "peace"), ("friend", "enemy"), ("similarity", "difference"),
)  # fmt: skip

# The first word of a question decides its type; "how many"/"how much" ask for a quantity.
WH_TYPES = {
    "who": "who", "whom": "who", "whose": "who", "what": "what", "which": "what",
    "when": "when", "where": "where", "why": "why", "how": "how", "whats": "what",
    "whos": "who", "wheres": "where", "hows": "how",
}  # fmt: skip
# "What is the best way to X?" asks what "How do I X?" asks; other wh-types are distinct.
QTYPE_CLASS = {"what": "open", "how": "open", "other": "open"}
MODALS = {
    "should": "must", "must": "must", "ought": "must", "shall": "must",
    "can": "can", "could": "can", "may": "can", "might": "can", "cannot": "can",
    "will": "will", "would": "will",
}  # fmt: skip
PERSONS = {
    "i": "1", "me": "1", "my": "1", "mine": "1", "myself": "1",
    "we": "1", "us": "1", "our": "1", "ours": "1", "ourselves": "1",
    "you": "2", "your": "2", "yours": "2", "yourself": "2", "yourselves": "2", "u": "2", "ur": "2",
    "someone": "indef", "somebody": "indef", "anyone": "indef", "anybody": "indef",
    "everyone": "indef", "everybody": "indef",
}  # fmt: skip
# The country, however written ("US", "U.S.", "USA"); lower-case "us" is the pronoun.
ALIASES = {"us": "usa", "usa": "usa"}
# Object pronouns take their subject form in ``terms`` so that "I murdered
# someone" / "someone murdered me" is seen as a role swap.
SUBJECT_FORM = {"me": "i", "us": "we", "him": "he", "them": "they"}
# Pronouns that fill a role (subject/object); role swaps among them matter.
ROLE_WORDS = frozenset({"i", "we", "you", "he", "she", "they", "someone", "somebody", "anyone", "anybody"})
AUX_ONE = frozenset({"does", "can", "could", "should", "would", "will", "may", "might", "must", "do"})
DEICTIC = frozenset({"this", "these", "those"})
HOW_QUANTITY = frozenset({"many", "much"})
WHAT_TIME = frozenset({"time", "year", "date", "day", "month", "century", "age"})
