"""Deterministic English sentences for the synthetic corpus, already in the tokenizer's alphabet.

Five domains — voice-assistant commands, numbers and digit strings, dates and times, names, and
everyday sentences (weather, food, travel, people, places) — are filled from word lists with a
``random.Random(seed)``. Digits are written as numerals and spelled out by
:func:`fedspeech_features.text.normalize_transcript`, so the transcripts read numbers the way real
normalised transcripts do. 1200 sentences use ~930 distinct words (300 use ~560).

>>> generate_sentences(2, seed=0)
['why is the horse so ugly', 'my cousin often drinks smoothies with dinner']
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from fedspeech_features.text import normalize_transcript


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(" ".join(p.split()) for p in text.split(","))


FIRST_NAMES = _words("""
    james mary robert patricia john jennifer michael linda david elizabeth william barbara richard
    susan joseph jessica thomas sarah charles karen daniel nancy matthew lisa anthony betty mark
    sandra paul ashley steven emily andrew donna kevin michelle brian carol george amanda edward
    melissa ronald deborah timothy stephanie jason rebecca jeffrey laura ryan sharon jacob cynthia
    gary kathleen nicholas amy eric angela jonathan anna peter emma oliver sophie henry grace jack
    olivia harry chloe oscar lucy samuel hannah noah ella leo zoe max ruby adam alice simon clara
    """)
LAST_NAMES = _words("""
    smith johnson williams brown jones miller davis wilson anderson taylor thomas moore martin
    jackson thompson white harris clark lewis robinson walker young allen king wright scott green
    baker adams nelson hill campbell mitchell roberts carter phillips evans turner parker collins
    edwards stewart morris murphy cook rogers morgan cooper peterson bailey reed kelly howard ward
    cox richardson wood watson brooks bennett gray hughes price sanders myers long ross foster
    """)
ROOMS = _words("kitchen bedroom bathroom hallway garage office basement attic nursery porch study")
DEVICES = _words("""
    lights lamp fan heater television radio speaker dishwasher oven kettle printer projector
    humidifier computer sprinkler toaster fridge freezer microwave blender
    """)
FOODS = _words("""
    apples bananas oranges grapes lemons cherries strawberries peaches pears plums melons carrots
    potatoes tomatoes onions garlic peppers cucumbers mushrooms spinach lettuce cabbage broccoli
    beans peas rice pasta noodles bread butter cheese yogurt eggs bacon sausages chicken beef fish
    salmon tuna shrimp soup salad pizza sandwiches pancakes waffles cereal honey jam chocolate
    cookies biscuits cake muffins pie almonds peanuts walnuts popcorn crackers olives avocados
    """)
DRINKS = _words("coffee tea milk juice lemonade water cocoa smoothies cider")
MEALS = _words("breakfast lunch dinner supper brunch dessert")
TASTES = _words("sweet salty sour bitter spicy delicious bland fresh crunchy creamy")
ANIMALS = _words("""
    dog cat horse cow sheep goat pig rabbit mouse squirrel fox wolf bear deer owl eagle parrot
    pigeon duck goose swan frog turtle snake lizard dolphin whale shark octopus crab bee butterfly
    spider ant tiger lion elephant giraffe zebra monkey kangaroo penguin hedgehog badger otter
    """)
PLACES = _words("""
    library station airport market museum hospital bakery park beach harbour bank pharmacy school
    university theatre cinema stadium gym church castle bridge tower village farm forest river
    lake mountain valley island garden zoo pier cafe restaurant hotel supermarket gallery office
    factory warehouse campsite playground pool post
    """)
CITIES = _words("""
    london paris berlin madrid rome vienna prague lisbon athens dublin edinburgh oslo stockholm
    helsinki copenhagen amsterdam brussels warsaw budapest tokyo sydney melbourne toronto
    vancouver montreal chicago boston denver seattle austin miami atlanta phoenix dallas houston
    cairo nairobi mumbai delhi singapore bangkok manila auckland glasgow manchester liverpool
    """)
OBJECTS = _words("""
    umbrella ticket bicycle notebook pencil wallet key jacket sweater scarf hat glove boot shoe
    backpack bottle cup plate spoon fork knife bowl basket box envelope letter parcel newspaper
    magazine book map camera phone laptop guitar piano violin drum ball kite blanket pillow
    mirror clock candle ladder hammer shovel bucket rope brush towel chair table sofa shelf desk
    window door fence gate carpet curtain painting photograph watch ring necklace coin stamp
    """)
ADJECTIVES = _words("""
    big small tiny huge old new young ancient modern bright dark heavy light soft hard smooth
    rough warm cold hot cool wet dry clean dirty noisy quiet busy empty full cheap expensive
    beautiful ugly strange famous friendly lazy clever brave careful gentle happy sad angry calm
    tired hungry curious lucky wooden plastic metal golden silver broken shiny dusty rusty
    colourful striped tall short narrow wide deep shallow sharp simple fancy precious
    """)
COLOURS = _words("red orange yellow green blue purple pink brown black white grey")
VERBS_PAST = _words("""
    bought found lost painted borrowed returned cleaned fixed carried dropped opened closed
    washed sold wrapped hid packed chose ordered delivered noticed repaired moved pushed pulled
    dragged lifted collected shared measured counted described photographed forgot mentioned
    """)
PROFESSIONS = _words("""
    teacher doctor nurse farmer baker plumber pilot lawyer engineer dentist chef painter writer
    driver gardener builder librarian scientist musician singer dancer actor journalist tailor
    carpenter electrician mechanic pharmacist architect student professor firefighter sailor
    """)
RELATIVES = _words("mother father sister brother aunt uncle cousin grandmother grandfather friend")
WEATHER = _words("sunny cloudy rainy windy foggy stormy snowy freezing humid mild chilly")
PRECIPITATION = _words("rain showers snow sleet hail thunder drizzle")
VEHICLES = _words("train bus flight ferry taxi coach tram")
TRAVEL_ITEMS = _words("passport suitcase luggage boarding charger sunglasses toothbrush tickets")
ADVERBS = _words("""
    quickly slowly quietly carefully suddenly happily loudly gently finally nearly almost
    probably certainly
    """)
DEGREES = _words("very rather quite really slightly surprisingly")
FREQUENCY = _words("usually rarely often never sometimes always")
GENRES = _words("jazz classical rock pop folk blues reggae country")
TASKS = _phrases("""
    call the dentist, water the plants, buy more milk, pay the rent, feed the cat, book a table,
    pick up the laundry, send the invoice, charge my phone, take out the rubbish, walk the dog,
    renew my passport, check the oven
    """)
WEEKDAYS = _words("monday tuesday wednesday thursday friday saturday sunday")
MONTHS = _words("""
    january february march april may june july august september october november december
    """)
PARTS_OF_DAY = _phrases("in the morning, in the afternoon, in the evening, at night")
# Future and present time phrases; PAST_WHEN goes with the past-tense templates.
WHEN = _phrases("""
    today, tomorrow, tonight, this afternoon, this evening, this weekend, next week, on monday,
    on friday, next month, later today, tomorrow morning
    """)
ALARM_DAYS = _phrases("today, tomorrow, on monday, on friday, every day, on weekdays")
PAST_WHEN = _phrases("""
    yesterday, last night, this morning, last week, on saturday, last month, a year ago,
    two days ago, earlier today, last summer, in the spring
    """)


def _a(word: str) -> str:
    """'a' or 'an' by the first letter (good enough for these word lists)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _time(rng: random.Random) -> str:
    hour = rng.randint(1, 12)
    form = rng.randrange(6)
    if form == 0:
        text = f"{hour} o'clock"
    elif form == 1:
        text = f"half past {hour}"
    elif form == 2:
        text = f"quarter {rng.choice(('past', 'to'))} {hour}"
    elif form == 3:
        text = f"{rng.choice((5, 10, 20, 25))} {rng.choice(('past', 'to'))} {hour}"
    elif form == 4:
        text = f"{hour} {rng.choice(range(10, 60, 5))}"
    else:
        return rng.choice(("noon", "midnight", "midday"))
    return f"{text} {rng.choice(PARTS_OF_DAY)}" if rng.random() < 0.4 else text


def _date(rng: random.Random) -> str:
    day = _ordinal(rng.randint(1, 28))
    if rng.random() < 0.5:
        return f"the {day} of {rng.choice(MONTHS)}"
    return f"{rng.choice(WEEKDAYS)} the {day}"


def _ordinal(n: int) -> str:
    return f"{n}{_ordinal_suffix(n)}"


def _ordinal_suffix(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


_IRREGULAR_PLURALS = dict(
    pair.split(":")
    for pair in _words("""
    sheep:sheep deer:deer mouse:mice goose:geese wolf:wolves fox:foxes octopus:octopuses
    butterfly:butterflies
    """)
)


def _plural(word: str) -> str:
    return _IRREGULAR_PLURALS.get(word, word + "s")


def _digits(rng: random.Random, count: int) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(count))


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


_Template = Callable[[random.Random], str]

_ASSISTANT: tuple[_Template, ...] = (
    lambda r: f"turn {r.choice(('on', 'off'))} the {r.choice(ROOMS)} {r.choice(DEVICES)}",
    lambda r: f"switch off the {r.choice(DEVICES)} in the {r.choice(ROOMS)} please",
    lambda r: f"set a timer for {r.randint(2, 90)} minutes",
    lambda r: f"set an alarm for {_time(r)} {r.choice(ALARM_DAYS)}",
    lambda r: f"remind me to {r.choice(TASKS)} at {_time(r)}",
    lambda r: f"play some {r.choice(GENRES)} music in the {r.choice(ROOMS)}",
    lambda r: f"what's the weather like in {r.choice(CITIES)} {r.choice(WHEN)}",
    lambda r: f"call {_name(r)} on {r.choice(('his', 'her', 'their'))} mobile",
    lambda r: f"add {r.choice(FOODS)} and {r.choice(DRINKS)} to my shopping list",
    lambda r: f"dim the {r.choice(ROOMS)} lights to {r.choice(range(10, 100, 10))} percent",
    lambda r: f"set the thermostat to {r.randint(16, 25)} degrees",
    lambda r: f"navigate to the nearest {r.choice(PLACES)}",
    lambda r: f"what time is it in {r.choice(CITIES)} right now",
    lambda r: (
        f"send a message to {r.choice(FIRST_NAMES)} saying i'll be {r.randint(5, 40)} minutes late"
    ),
    lambda r: f"how long does it take to drive to {r.choice(CITIES)}",
)
_NUMBERS: tuple[_Template, ...] = (
    lambda r: f"my phone number is {_digits(r, r.choice((7, 10)))}",
    lambda r: f"the access code is {_digits(r, r.randint(4, 6))}",
    lambda r: f"please enter the pin {_digits(r, 4)}",
    lambda r: f"your order number is {r.randint(100, 99999)}",
    lambda r: f"it costs {r.randint(2, 999)} dollars and {r.randint(1, 99)} cents",
    lambda r: f"the total comes to {r.randint(1, 500)}.{r.randint(1, 9)} pounds",
    lambda r: f"room {r.randint(100, 950)} is on floor {r.randint(1, 30)}",
    lambda r: (lambda a, b: f"{a} plus {b} equals {a + b}")(r.randint(1, 99), r.randint(1, 99)),
    lambda r: (
        f"there are {r.randint(2, 1000)} {_plural(r.choice(ANIMALS))} near the {r.choice(PLACES)}"
    ),
    lambda r: (
        f"the {r.choice(VEHICLES)} number {r.randint(1, 999)} is {r.randint(2, 59)} minutes late"
    ),
    lambda r: f"about {r.randint(2, 99)} percent of the {_plural(r.choice(PROFESSIONS))} agreed",
)
_DATETIME: tuple[_Template, ...] = (
    lambda r: f"on the {_ordinal(r.randint(1, 31))} of {r.choice(MONTHS)} at {_time(r)}",
    lambda r: f"the meeting is on {r.choice(WEEKDAYS)} at {_time(r)}",
    lambda r: (
        f"{r.choice(FIRST_NAMES)} was born on {r.choice(MONTHS)} "
        f"{_ordinal(r.randint(1, 31))} {r.randint(1930, 2024)}"
    ),
    lambda r: f"we leave on {_date(r)} and come back {r.randint(2, 14)} days later",
    lambda r: f"the {r.choice(PLACES)} opens at {_time(r)} and closes at {_time(r)}",
    lambda r: f"the {r.choice(VEHICLES)} to {r.choice(CITIES)} departs at {_time(r)}",
    lambda r: f"the old {r.choice(PLACES)} was built in {r.randint(1800, 2024)}",
    lambda r: f"my {r.choice(RELATIVES)}'s birthday is on {_date(r)}",
)
_NAMES: tuple[_Template, ...] = (
    lambda r: f"{_name(r)} is {_a(r.choice(PROFESSIONS))} from {r.choice(CITIES)}",
    lambda r: f"please ask {r.choice(FIRST_NAMES)} to call me back {r.choice(WHEN)}",
    lambda r: f"hello this is {_name(r)} speaking",
    lambda r: (
        f"{r.choice(FIRST_NAMES)} and {r.choice(FIRST_NAMES)} went to the "
        f"{r.choice(PLACES)} {r.choice(PAST_WHEN)}"
    ),
    lambda r: f"my name is {_name(r)} and i work as {_a(r.choice(PROFESSIONS))}",
    lambda r: f"have you met {r.choice(FIRST_NAMES)}'s {r.choice(RELATIVES)}",
    lambda r: f"doctor {r.choice(LAST_NAMES)} will see you at {_time(r)}",
)
_EVERYDAY: tuple[_Template, ...] = (
    lambda r: (
        f"the {r.choice(ADJECTIVES)} {r.choice(ANIMALS)} jumped over the "
        f"{r.choice(ADJECTIVES)} {r.choice(OBJECTS)}"
    ),
    lambda r: (
        f"{r.choice(FIRST_NAMES)} {r.choice(VERBS_PAST)} {_a(r.choice(ADJECTIVES))} "
        f"{r.choice(COLOURS)} {r.choice(OBJECTS)} at the {r.choice(PLACES)} {r.choice(PAST_WHEN)}"
    ),
    lambda r: f"we had {r.choice(FOODS)} and {r.choice(FOODS)} for {r.choice(MEALS)}",
    lambda r: f"the {r.choice(FOODS)} tasted {r.choice(DEGREES)} {r.choice(TASTES)}",
    lambda r: (
        f"it will be {r.choice(WEATHER)} in {r.choice(CITIES)} {r.choice(WHEN)} with "
        f"{r.randint(2, 35)} degrees"
    ),
    lambda r: f"there is a chance of {r.choice(PRECIPITATION)} {r.choice(PARTS_OF_DAY)}",
    lambda r: (
        f"the {r.choice(VEHICLES)} to {r.choice(CITIES)} leaves from platform {r.randint(1, 12)}"
    ),
    lambda r: f"don't forget your {r.choice(TRAVEL_ITEMS)} and your {r.choice(TRAVEL_ITEMS)}",
    lambda r: (
        f"our {r.choice(VEHICLES)} to {r.choice(CITIES)} was delayed by {r.randint(5, 90)} minutes"
    ),
    lambda r: (
        f"i think the {r.choice(ADJECTIVES)} {r.choice(OBJECTS)} belongs to {r.choice(FIRST_NAMES)}"
    ),
    lambda r: f"can you put the {r.choice(OBJECTS)} on the {r.choice(OBJECTS)}",
    lambda r: (
        f"the {r.choice(PROFESSIONS)} {r.choice(ADVERBS)} {r.choice(VERBS_PAST)} the "
        f"{r.choice(ADJECTIVES)} {r.choice(OBJECTS)}"
    ),
    lambda r: f"where did you leave the {r.choice(COLOURS)} {r.choice(OBJECTS)}",
    lambda r: f"why is the {r.choice(ANIMALS)} so {r.choice(ADJECTIVES)}",
    lambda r: f"a {r.choice(ADJECTIVES)} {r.choice(ANIMALS)} lives near the {r.choice(PLACES)}",
    lambda r: (
        f"my {r.choice(RELATIVES)} {r.choice(FREQUENCY)} drinks {r.choice(DRINKS)} with "
        f"{r.choice(MEALS)}"
    ),
)
# Domain weights: everyday sentences carry most of the vocabulary; the others teach the
# patterns a voice assistant hears (commands, numbers, dates, names).
DOMAINS: dict[str, tuple[float, tuple[_Template, ...]]] = {
    "assistant": (0.2, _ASSISTANT),
    "numbers": (0.15, _NUMBERS),
    "datetime": (0.15, _DATETIME),
    "names": (0.15, _NAMES),
    "everyday": (0.35, _EVERYDAY),
}


def generate_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences drawn from every domain, deterministic in ``seed``.

    Each sentence is already normalised (lowercase a-z, space, apostrophe): it passes
    :func:`fedspeech_features.text.normalize_transcript` unchanged.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(seed)
    names = list(DOMAINS)
    weights = [DOMAINS[name][0] for name in names]
    out = []
    for _ in range(count):
        domain = rng.choices(names, weights)[0]
        template = rng.choice(DOMAINS[domain][1])
        out.append(normalize_transcript(template(rng)))
    return out


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def generate_digits(count: int, seed: int = 0) -> list[str]:
    """``count`` single digit words ("zero" .. "nine"), each digit equally often, shuffled by ``seed``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out = [DIGIT_WORDS[i % len(DIGIT_WORDS)] for i in range(count)]
    random.Random(seed).shuffle(out)
    return out


def vocabulary(sentences: Iterable[str]) -> set[str]:
    """Distinct words of ``sentences``."""
    return {word for sentence in sentences for word in sentence.split()}
