"""A probabilistic grammar of a small assistant domain (commands, bookings, dates, times,
numbers, lists), used to make the embedded corpus's transcripts and its text-only LM corpus.

The grammar has real structure that an LM trained on text can learn but the acoustics of a
single word leave open: devices belong to rooms, people counts agree with "person"/"people",
month names are followed by valid day ordinals, list items come from one category per list,
and frames repeat fixed phrases ("for ... people at ... on ..."). Every word is an ordinary
English word spelled out in lower case (numbers too), so a pronunciation lexicon covers it.

Example
-------
>>> import random
>>> grammar = DomainGrammar()
>>> rng = random.Random(0)
>>> sentence = grammar.sentence(rng)
>>> sentence == sentence.lower() and len(sentence.split()) >= 3
True
>>> grammar.sentence(random.Random(0)) == sentence
True
"""

import random

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = [
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_ONES = [
    "", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
]
_ORDINAL_TEENS = [
    "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
    "seventeenth", "eighteenth", "nineteenth",
]
_MONTH_DAYS = {
    "january": 31, "february": 28, "march": 31, "april": 30, "may": 31, "june": 30,
    "july": 31, "august": 31, "september": 30, "october": 31, "november": 30, "december": 31,
}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]

# Devices are tied to the rooms they live in: the LM learns "oven" after "kitchen".
_ROOM_DEVICES = {
    "kitchen": ["lights", "oven", "fan", "radio", "kettle"],
    "bedroom": ["lights", "heater", "fan", "blinds", "alarm"],
    "living room": ["lights", "television", "heater", "blinds", "speakers"],
    "bathroom": ["lights", "heater", "fan"],
    "garage": ["lights", "door", "heater"],
    "office": ["lights", "printer", "heater", "fan", "speakers"],
}
_DEVICE_ACTIONS = {
    "lights": ["turn on", "turn off", "dim", "brighten"],
    "oven": ["turn on", "turn off", "preheat"],
    "fan": ["turn on", "turn off", "speed up", "slow down"],
    "radio": ["turn on", "turn off", "mute"],
    "kettle": ["turn on", "turn off"],
    "heater": ["turn on", "turn off"],
    "blinds": ["open", "close", "lower", "raise"],
    "alarm": ["set", "cancel", "snooze"],
    "television": ["turn on", "turn off", "mute"],
    "speakers": ["turn on", "turn off", "mute"],
    "door": ["open", "close", "lock", "unlock"],
    "printer": ["turn on", "turn off"],
}
# Items of one list share a category: "milk" predicts "bread", not "hammer".
_LIST_ITEMS = {
    "shopping": [
        "milk", "bread", "eggs", "butter", "cheese", "apples", "bananas", "coffee", "rice",
        "pasta", "tomatoes", "onions", "chicken", "yogurt", "oranges", "potatoes",
    ],
    "packing": [
        "socks", "shirts", "shoes", "jacket", "passport", "charger", "towel", "umbrella",
        "sunglasses", "toothbrush", "camera", "hat",
    ],
    "hardware": [
        "nails", "screws", "hammer", "paint", "brushes", "glue", "tape", "batteries",
        "gloves", "ladder", "drill", "rope",
    ],
}
_PLACES = {
    "table": ["restaurant", "cafe", "bistro", "pizza place", "steak house"],
    "room": ["hotel", "inn", "lodge"],
    "ticket": ["concert", "museum", "theater", "football match", "cinema"],
}
_CITIES = [
    "london", "paris", "boston", "chicago", "berlin", "madrid", "dublin", "denver",
    "seattle", "toronto", "sydney", "tokyo",
]
_CONTACTS = [
    "mom", "dad", "anna", "peter", "maria", "james", "sarah", "david", "linda", "robert",
]
_FEMALE_CONTACTS = {"mom", "anna", "maria", "sarah", "linda"}
_REMINDERS = [
    "call the doctor", "pay the rent", "water the plants", "feed the cat", "take my pills",
    "buy a present", "send the report", "pick up the kids", "walk the dog", "book a taxi",
]


def number_words(n):
    """Spell out an integer from 0 to 9999 in English words.

    Example
    -------
    >>> number_words(1234)
    'one thousand two hundred thirty four'
    >>> number_words(70)
    'seventy'
    """
    if not 0 <= n <= 9999:
        raise ValueError(f"number_words handles 0..9999, got {n}")
    if n < 10:
        return _ONES[n]
    if n < 20:
        return _TEENS[n - 10]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
        return head if rest == 0 else head + " " + number_words(rest)
    thousands, rest = divmod(n, 1000)
    head = _ONES[thousands] + " thousand"
    return head if rest == 0 else head + " " + number_words(rest)


def ordinal_words(n):
    """Spell out an ordinal from 1 to 31.

    Example
    -------
    >>> ordinal_words(23)
    'twenty third'
    >>> ordinal_words(30)
    'thirtieth'
    """
    if not 1 <= n <= 31:
        raise ValueError(f"ordinal_words handles 1..31, got {n}")
    if n < 10:
        return _ORDINAL_ONES[n]
    if n < 20:
        return _ORDINAL_TEENS[n - 10]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return {2: "twentieth", 3: "thirtieth"}[tens]
    return _TENS[tens] + " " + _ORDINAL_ONES[ones]


class DomainGrammar:
    """Samples sentences of the assistant domain.

    Each top-level intent is a weighted production; ``sentence`` draws one with the given
    ``random.Random`` so that a corpus is a deterministic function of its seed.

    Arguments
    ---------
    intent_weights : dict, optional
        Relative weight of each intent (keys of ``DomainGrammar.INTENTS``).
    """

    INTENTS = ("device", "booking", "reminder", "timer", "list", "weather", "call", "math")

    def __init__(self, intent_weights=None):
        weights = dict.fromkeys(self.INTENTS, 1.0)
        weights.update(intent_weights or {})
        unknown = set(weights) - set(self.INTENTS)
        if unknown:
            raise ValueError(f"Unknown intents {sorted(unknown)}; choose from {self.INTENTS}")
        self.intents = list(weights)
        self.weights = [weights[k] for k in self.intents]

    def sentence(self, rng):
        """Returns one sentence (lower case words separated by single spaces)."""
        intent = rng.choices(self.intents, self.weights)[0]
        words = getattr(self, "_" + intent)(rng)
        return " ".join(words.split())

    def sentences(self, count, seed, unique=True, exclude=()):
        """Returns ``count`` sentences drawn with ``seed``; distinct when ``unique``.

        Sentences in ``exclude`` are never returned, which keeps corpora disjoint.
        """
        rng = random.Random(seed)
        seen = set(exclude)
        out = []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise RuntimeError(
                    f"The grammar produced only {len(out)} new sentences of {count} asked; "
                    "ask for fewer or widen the grammar."
                )
            s = self.sentence(rng)
            if unique and s in seen:
                continue
            seen.add(s)
            out.append(s)
        return out

    # --- productions -----------------------------------------------------------------
    @staticmethod
    def _politeness(rng):
        return rng.choice(["", "", "please", "could you", "can you"])

    def _time(self, rng):
        hour = rng.randint(1, 12)
        minute = rng.choice([0, 0, 15, 30, 45, rng.randint(1, 59)])
        if minute == 0:
            clock = number_words(hour) + rng.choice([" o'clock", ""])
        elif minute < 10:
            clock = f"{number_words(hour)} oh {number_words(minute)}"
        else:
            clock = f"{number_words(hour)} {number_words(minute)}"
        period = rng.choice(["", "in the morning", "in the evening", "at night", "pm", "am"])
        if period in ("pm", "am"):
            period = {"pm": "p m", "am": "a m"}[period]
        return f"{clock} {period}"

    def _date(self, rng):
        kind = rng.random()
        if kind < 0.35:
            return rng.choice(["today", "tomorrow", "tonight", "next week"])
        if kind < 0.65:
            return rng.choice(["on ", "next ", "this "]) + rng.choice(_WEEKDAYS)
        month = rng.choice(list(_MONTH_DAYS))
        day = rng.randint(1, _MONTH_DAYS[month])
        if rng.random() < 0.5:
            return f"on the {ordinal_words(day)} of {month}"
        return f"on {month} {ordinal_words(day)}"

    def _device(self, rng):
        room = rng.choice(list(_ROOM_DEVICES))
        device = rng.choice(_ROOM_DEVICES[room])
        action = rng.choice(_DEVICE_ACTIONS[device])
        if device == "heater" and rng.random() < 0.4:
            degrees = rng.randint(15, 30)
            return f"{self._politeness(rng)} set the {room} heater to {number_words(degrees)} degrees"
        if device == "alarm" and action == "set":
            return f"set the bedroom alarm for {self._time(rng)}"
        if device == "oven" and action == "preheat":
            degrees = rng.choice([180, 200, 220, 350, 375, 400, 425])
            return f"preheat the oven to {number_words(degrees)} degrees"
        tail = rng.choice(["", "", "now", f"at {self._time(rng)}", "in ten minutes"])
        return f"{self._politeness(rng)} {action} the {room} {device} {tail}"

    def _booking(self, rng):
        thing = rng.choice(list(_PLACES))
        place = rng.choice(_PLACES[thing])
        count = rng.choice([1, 2, 2, 3, 4, 4, 5, 6, 8, 10, 12])
        verb = rng.choice(["book", "reserve", "i would like to book", "please book"])
        if thing == "table":
            people = "person" if count == 1 else "people"
            return (
                f"{verb} a table for {number_words(count)} {people} at the {place} "
                f"{self._date(rng)} at {self._time(rng)}"
            )
        if thing == "room":
            nights = rng.randint(1, 7)
            night_word = "night" if nights == 1 else "nights"
            return (
                f"{verb} a room at the {place} in {rng.choice(_CITIES)} for "
                f"{number_words(nights)} {night_word} starting {self._date(rng)}"
            )
        tickets = "ticket" if count == 1 else "tickets"
        return f"{verb} {number_words(count)} {tickets} for the {place} {self._date(rng)}"

    def _reminder(self, rng):
        task = rng.choice(_REMINDERS)
        when = rng.choice(
            [self._date(rng), f"at {self._time(rng)}", f"{self._date(rng)} at {self._time(rng)}"]
        )
        lead = rng.choice(["remind me to", "please remind me to", "do not let me forget to"])
        return f"{lead} {task} {when}"

    def _timer(self, rng):
        amount = rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 45, 90])
        unit = rng.choice(["minute", "second", "hour"])
        unit = unit if amount == 1 else unit + "s"
        lead = rng.choice(["set a timer for", "start a timer for", "count down"])
        return f"{lead} {number_words(amount)} {unit}"

    def _list(self, rng):
        category = rng.choice(list(_LIST_ITEMS))
        items = rng.sample(_LIST_ITEMS[category], rng.randint(1, 4))
        if len(items) == 1:
            spoken = items[0]
        else:
            spoken = " ".join(items[:-1]) + " and " + items[-1]
        lead = rng.choice(["add", "please add", "put"])
        return f"{lead} {spoken} to my {category} list"

    def _weather(self, rng):
        city = rng.choice(_CITIES)
        question = rng.choice(
            [
                "what is the weather in {c} {d}",
                "will it rain in {c} {d}",
                "how cold will it be in {c} {d}",
                "do i need an umbrella in {c} {d}",
            ]
        )
        return question.format(c=city, d=self._date(rng))

    def _call(self, rng):
        who = rng.choice(_CONTACTS)
        if rng.random() < 0.5:
            # Pronoun agreement: "her" follows the female contacts, "his" the male ones.
            pronoun = "her" if who in _FEMALE_CONTACTS else "his"
            where = rng.choice(["", "now", "at home", f"on {pronoun} mobile"])
            return f"{rng.choice(['call', 'phone', 'ring'])} {who} {where}"
        return f"send a message to {who} saying i will be there at {self._time(rng)}"

    def _math(self, rng):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "minus", "times"])
        return f"what is {number_words(a)} {op} {number_words(b)}"
