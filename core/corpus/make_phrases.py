#!/usr/bin/env python3
"""Generate feedloop's default English phrase corpus (core/corpus/phrases.txt).

Every word list and template below was written by hand for feedloop; nothing is
downloaded or copied from an outside data set.  The script uses only the standard
library and is deterministic: the same --seed and --count always give the same file.

Regenerate the shipped corpus (from the repository root) with:

    python core/corpus/make_phrases.py    # same as: --seed 7 --count 6000
                                          #   --output core/corpus/phrases.txt

The grammar
-----------
* TOPICS (food, travel, nature, weather, sports, music, work, home, city, sea, tech,
  family, books, health, seasons, garden, pets, art) each give:
    g  ADJS / NOUNS   a noun group; the adjectives were chosen to fit every noun in the
                      group ("crusty bread", never "crusty rain").  "loaf:loaves" gives an
                      irregular plural, "*coffee" marks a mass noun (no "a", no plural),
                      "_" joins a two-word noun.  The "g@" group holds place nouns for
                      "welcome to the cozy kitchen!" and the like.
    p  where-phrases that can follow any noun of the topic ("by the river")
    a  actions: imperative verb phrases that fit any time ("bake a loaf of bread")
    u  audiences, plural people ("home cooks")
    e  events for invitations ("a potluck dinner")
    x  template families the topic skips (weather has no product taglines)
* TEMPLATES: eleven families (tagline, title, suggestion, greeting, slogan, caption,
  invitation, motivation, question, headline, reminder).  Slots in braces are filled
  from the chosen topic: {A} {N} {NS} adjective, noun, plural; {AN} "a/an A N" (bare for
  mass nouns); {ANS} "A NS"; the same with a 2 for a second noun group of the topic;
  {LA} {LOC} an adjective and a place noun; {ACT} an action ({ACTW}: "your" -> "our",
  for "let's ..."); {PL} {AUD} {EV} topic phrases; {TM} {WHEN} {DP} {DAY} {DA} {PA} {NUM}
  {SEASON} {FOR} {FRIENDS} shared lists.  A part in [square brackets] is kept half of the
  time, which varies lengths.  Templates under a "name!c" key need a countable noun.
  "a"/"an" is fixed afterwards by the sound of the next word.
Each phrase: pick a topic, a family, a template, fill the slots, keep it if it has 3 to
12 words, repeats no word but small ones like "the", and is new. Words, nouns and
actions are drawn least-used first, and the last tenth of the phrases must each hold a
word seen in fewer than five phrases, so every word of the corpus appears in at least
five phrases. Output is one phrase per line, lower case ASCII, in generation order.
"""

from __future__ import annotations

import argparse
import random
import re
import string
from pathlib import Path

TOPICS = """
== food
g fresh warm golden homemade crusty soft / bread loaf:loaves bagel muffin
g sweet warm homemade golden tiny / cake pie cookie pancake
g fresh hot strong rich smooth dark / *coffee *espresso
g hot fresh green herbal / *tea
g fresh ripe juicy sweet local / apple peach:peaches plum berry:berries
g hot warm hearty homemade spicy / *soup *stew *chili
g fresh crisp green colorful simple / salad
g@ cozy little busy bright quiet / kitchen bakery:bakeries cafe market
p in the kitchen|at home|on the table|at the farmers market|at the corner cafe|on the back porch
a bake a loaf of bread|try a new recipe|cook a big dinner|brew a fresh pot of coffee
a share a slice of pie|make soup from scratch|slice ripe peaches|plan a simple lunch
a bake a batch of cookies|set the table early|taste something new|mix a bowl of pancake batter
u home cooks|food lovers|hungry friends|coffee lovers|bakers
e a potluck dinner|a cooking class|a pancake breakfast|a tasting night|a bake sale
== travel
g long quiet scenic winding open dusty / road trail highway
g cozy tiny quiet charming old / hotel inn cabin cottage
g long slow scenic early overnight / train journey trip
g faraway hidden distant sunny quiet / island town
g old trusty little worn / suitcase backpack map
g bright colorful old / postcard souvenir
g@ charming quiet busy sunny little / village station harbor port
p far from home|on a budget|abroad|off the beaten path|around the world|by the coast
a pack a light bag|catch an early train|plan a weekend trip|visit a small town
a send a postcard home|explore the old quarter|try the local food|learn a few new words
a find a hidden cafe|book a cozy cabin|wander without a map|ride a bike along the coast
u travelers|explorers|wanderers|road trippers|globetrotters
e a walking tour|a road trip|a weekend getaway|a city tour|a travel night
== nature
g tall green ancient old / tree oak pine willow
g wild tiny bright golden yellow / flower daisy:daisies sunflower
g quiet clear cool still winding / river stream lake pond
g tall rocky distant snowy blue / mountain hill peak
g golden fallen bright red / leaf:leaves
g tiny busy bright little / bird bee butterfly:butterflies
g@ quiet green shady deep misty / forest grove meadow valley:valleys
p in the forest|by the river|on the mountain|in the meadow|near the lake|under the open sky
a take a slow walk by the river|listen to the birds|watch the clouds drift by
a find a quiet spot in the woods|collect smooth stones|breathe the fresh air
a follow a winding trail|sit on a mossy log|count the wildflowers|sketch a tall tree
a pack a picnic basket|look for deer tracks
u nature lovers|hikers|bird watchers|campers|explorers
e a nature walk|a bird watching hike|a forest picnic|a trail cleanup|a campfire night
== weather
g light gentle steady soft warm / *rain *drizzle
g bright warm golden gentle / *sunshine *sunlight
g cool fresh gentle soft warm / breeze wind
g fresh soft deep quiet / *snow
g dark heavy gray fluffy white / cloud
g loud sudden summer / storm thunderstorm
g bright colorful double / rainbow
g thick gray cool / *fog *mist
g@ wide open bright gray / sky:skies horizon
p over the hills|across the valley|along the coast|over the city|outside the window|across the bay
a grab an umbrella|wear a warm coat|watch the storm roll in|enjoy the sunshine
a open the windows wide|check the forecast|bring a light jacket|stay cozy indoors
a dance in the rain|build a snowman|look for a rainbow|hang the laundry outside
u weather watchers|early risers|neighbors|commuters|friends
e a rainy day movie marathon|a snow day party|a storm watching night|a sunny picnic
e a stargazing night
x tagline headline
== sports
g fast long easy steady / run race
g big close friendly tough / game match:matches
g bright green wide open / field court track
g new fast proud young happy / team player coach:coaches
g new red old lucky / ball jersey sneaker bike
g@ busy bright big local / gym stadium rink park
p at the park|on the field|at the stadium|in the gym|at the rink|on the court
a go for a short run|join a local team|practice your free throws|stretch before you play
a cheer for the home team|ride your bike to the park|swim a few laps|kick a ball around
a train for a big race|play a friendly match|try a new sport|lace up your sneakers
u runners|athletes|sports fans|players|teammates
e a charity run|a friendly match|a bike ride|a yoga class|a soccer game
== music
g happy soft slow sweet old favorite golden / song tune melody:melodies lullaby:lullabies
g bright warm loud gentle steady / beat rhythm
g old wooden shiny little / guitar piano violin drum
g live small loud free open / concert show session
g local young happy talented / band singer choir
g@ cozy small busy little / studio hall club theater
p on the radio|in the park|at the corner cafe|on stage|all night long|in the city
a learn a new song|play the piano|sing along|write a simple melody|dance in the kitchen
a listen to an old record|join a local choir|tune your guitar|make a playlist|hum a happy tune
a practice your scales|go to a live show
u music lovers|singers|dancers|musicians|listeners
e an open mic night|a garden concert|a jazz evening|a sing along|a piano recital
== work
g bright new clever simple fresh big / idea plan goal project
g quiet busy long productive short / day week meeting shift
g kind friendly small great happy / team colleague mentor crew
g clean tidy wooden sturdy / desk chair shelf:shelves
g@ quiet bright open sunny busy / office studio workshop
p at the office|at work|in the workshop|in the meeting room|on the whiteboard|at the studio
a take a short break|write a clear plan|clean up your desk|call an old colleague
a finish one small task|learn a new skill|ask a good question|thank your team|set a simple goal
a share a fresh idea|plan the week ahead|leave work on time
u coworkers|teams|makers|founders|builders
e a team lunch|a planning meeting|a career fair|a skills workshop|an office party
== home
g soft warm thick cozy / blanket pillow sweater
g clean fresh crisp white warm / towel sheet
g warm bright golden little / lamp candle lantern
g old wooden round sturdy / table chair door
g green tiny leafy potted / plant fern
g@ cozy bright warm tidy sunny quiet / room kitchen porch attic
p by the window|on the porch|in the living room|at home|by the fire|in every room
a tidy up the living room|light a few candles|open the curtains|make a cup of tea
a rearrange the furniture|water the plants|bake something sweet|fold the laundry
a read on the couch|paint the front door|hang a new picture|clear out the closet
u homeowners|neighbors|roommates|families|homebodies
e a housewarming party|a movie night|a cozy dinner|a garage sale|a game night
== city
g busy quiet narrow old bright / street avenue alley square
g tall shiny old glass / tower bridge
g busy crowded late early / bus:buses train subway tram
g bright neon golden / light sign
g busy friendly local / neighbor crowd
g@ small cozy busy hidden little / cafe bakery:bakeries bookshop market
p downtown|in the old town|on every corner|across the river|after dark|near the station
a take the scenic bus route|find a rooftop view|walk across the old bridge|visit a local market
a try a new cafe|ride the subway|explore a hidden alley|support local shops
a sit in the town square|visit the city museum|ride the tram across town|relax on a park bench
u city dwellers|neighbors|commuters|locals|visitors
e a street fair|a night market|a walking tour|a block party|a rooftop dinner
== sea
g blue calm wild deep gentle / wave sea ocean tide
g old white tall lonely / lighthouse boat sailboat
g tiny bright pink smooth golden / shell pebble starfish:starfish
g warm salty cool fresh / breeze wind
g white gray noisy / seagull
g@ sandy quiet golden sunny rocky / beach:beaches shore cove bay
p by the sea|on the shore|along the coast|at low tide|in the harbor|by the dunes
a walk barefoot on the sand|collect seashells|build a sandcastle|watch the waves roll in
a go sailing|swim in the cool water|fly a kite on the beach|look for starfish|rent a small boat
a listen to the waves|paddle out past the waves|eat lunch by the water
u sailors|beachgoers|swimmers|surfers|sea lovers
e a beach picnic|a sunset cruise|a sailing lesson|a beach cleanup|a bonfire on the beach
== tech
g smart simple fast tiny sleek / app phone gadget laptop
g bright clear sharp big / screen
g fast simple secure smart / update tool feature
g clean simple smart clever / design
g fast stable secure free / network connection
g@ bright busy quiet open / lab studio workshop
p in your pocket|on your desk|in every home|at the office|in the lab|on every device
a update your apps|back up your photos|try a new app|take a break from screens
a clean up your inbox|learn to code|charge your phone|set up a new laptop|turn off notifications
a build a small website|organize your files|restart your router
u developers|makers|gamers|tech fans|early adopters
e a coding night|a product launch|a tech meetup|a robotics class|a hack day
== family
g happy busy big loving close / family:families
g little sleepy happy giggly curious / kid baby:babies
g kind wise loving gentle / grandma grandpa aunt uncle
g big happy lazy long / weekend holiday reunion
g warm sweet happy old golden / memory:memories story:stories photo hug
g@ cozy busy happy warm / home house backyard
p at home|at grandma's house|around the table|in the backyard|on the couch|at the park
a call your grandma|read a bedtime story|build a pillow fort|play a board game
a cook breakfast together|look through old photos|plant a tree together|share a funny story
a write a thank you note|bake cookies|go on a family walk|plan a family trip
u families|parents|grandparents|kids|little ones
e a family picnic|a birthday party|a family reunion|a holiday dinner|a movie night
== books
g old good thick favorite / book novel story:stories
g old blank worn leather / notebook journal diary:diaries
g favorite gentle funny wise / poem author poet
g quiet rainy lazy golden / afternoon evening
g happy strange long lost / chapter page letter
g@ quiet cozy old little / library:libraries bookshop bookstore
p in the library|on the shelf|by the fireplace|in a cozy chair|at the bookshop|before bed
a read a chapter|start a new novel|write in your journal|visit the library|join a book club
a read a poem aloud|return your library books|share a favorite book|write a short story
a find a quiet reading nook|lend a book to a friend|write a letter by hand
u readers|book lovers|writers|poets|bookworms
e a book club meeting|a poetry reading|a story hour|a book swap|an author talk
== health
g deep slow calm / breath
g good restful deep / *sleep
g short lazy quick / nap
g fresh green healthy simple / salad meal snack
g long gentle easy brisk / walk stretch
g cold clean fresh / *water
g strong healthy happy calm / mind body:bodies heart
g small healthy good daily / habit routine
g@ calm quiet bright / studio gym park
p every day|at your own pace|in the fresh air|after a long day|for body and mind|one day at a time
a drink more water|take a deep breath|stretch for ten minutes|go to bed early
a eat more vegetables|take the stairs|take a brisk walk|try a yoga class|rest when you need to
a cook a healthy meal|unplug for an hour|get some fresh air
u wellness fans|runners|early risers|yoga lovers|night owls
e a yoga class|a wellness walk|a healthy cooking class|a meditation session|a fun run
== seasons
g golden crisp red fallen bright / leaf:leaves
g long warm lazy bright golden / day evening afternoon
g first soft fresh quiet / *snow *frost snowfall
g early bright fresh pink / blossom bloom
g cool crisp clear fresh / *air
g warm cozy thick wool / scarf:scarves mitten coat sweater
g@ golden quiet sunny snowy / orchard park field
p in the park|all season long|across the hills|this time of year|in our town|on the hillside
a rake the leaves|pick apples at an orchard|plant spring bulbs|go ice skating|carve a pumpkin
a build a snowman|watch the leaves fall|wear your coziest scarf|plant a small garden
a have a picnic outside|drink hot cider|count the first blossoms
u nature lovers|neighbors|friends|leaf peepers|snow lovers
e a harvest festival|a spring fair|a winter market|a summer picnic|a pumpkin hunt
== garden
g ripe red fresh juicy homegrown / tomato:tomatoes strawberry:strawberries pepper
g sweet fresh green wild / herb
g fresh green sweet / *mint *basil *lettuce
g bright tall pink tiny / rose tulip lily:lilies
g tiny green fresh young / seed sprout seedling
g old trusty rusty wooden / shovel rake wheelbarrow
g@ green quiet little sunny secret / garden yard greenhouse
p in the backyard|by the fence|in the greenhouse|along the path|in the raised beds|by the gate
a plant a row of seeds|water the tomatoes|pull a few weeds|pick fresh herbs|build a raised bed
a start a compost pile|grow your own lettuce|trim the roses|spread fresh mulch
a plant a little herb garden|harvest the beans|save seeds for next year
u gardeners|growers|plant lovers|green thumbs|neighbors
e a seed swap|a garden tour|a plant sale|a harvest supper|a community planting day
== pets
g happy fluffy sleepy playful loyal little / dog puppy:puppies pup
g curious sleepy fluffy soft little / cat kitten
g tiny bright chirpy / parrot canary:canaries
g long happy short muddy / walk
g squeaky favorite old chewy / toy ball bone
g@ busy sunny quiet friendly / shelter park yard
p at the dog park|on the couch|in the sunshine|in the backyard|by the front door|on the windowsill
a take the dog for a walk|brush your cat|teach your puppy a new trick|play fetch in the yard
a give your pet a treat|adopt a shelter pet|buy a new chew toy|visit the vet|clean the fish tank
a cuddle your kitten|wash a muddy dog|walk the dog
u pet lovers|dog owners|cat lovers|pet parents|animal lovers
e a pet adoption day|a dog walk|a puppy class|a pet costume contest|a dog park meetup
== art
g bright bold soft warm pale / color shade
g little colorful bright messy / painting sketch drawing
g fresh wet thick bright / *paint
g blank clean white / canvas:canvases page
g bold bright simple / pattern poster
g@ old sunny quiet little / studio gallery:galleries
p on the wall|in the gallery|in the studio|on the easel|by the window|in the sketchbook
a paint a small landscape|sketch your morning coffee|try watercolor|visit a gallery
a draw something new|make a collage|mix a new color|paint with your fingers|take a pottery class
a frame a favorite drawing|doodle on a napkin|fill a sketchbook
u artists|painters|creators|art lovers|doodlers
e a painting class|a gallery opening|an art walk|a pottery workshop|a sketch night
"""

SHARED = {
    "TM": "this morning|every morning|tomorrow morning|tonight|this evening|this weekend|"
    "on sunday|on saturday morning|after work|today|after lunch|before breakfast|"
    "this afternoon|this week|next weekend|on friday night",
    "WHEN": "tonight|this evening|this weekend|on sunday|on saturday morning|after work|"
    "this afternoon|next weekend|on friday night|tomorrow morning",
    "DP": "morning|morning|afternoon|evening",
    "DAY": "monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekend",
    "DA": "bright|happy|sunny|lovely|peaceful|wonderful|cozy|great|relaxing|quiet|warm",
    "PA": "happy|lovely|sunny|dear|wonderful|sleepy|busy|bright|brave|kind|amazing",
    "NUM": "three|five|seven|ten|twelve",
    "SEASON": "spring|summer|autumn|winter",
    "FOR": "morning|day|season|moment|occasion",
    "FRIENDS": "friends|everyone|neighbors|folks",
}

# family -> templates.  "name!c": needs a countable noun.
TEMPLATES = {
    "tagline": [
        "{ANS} for every {FOR}",
        "{ANS} for {AUD}",
        "{ANS}, made for {AUD}",
        "simply {ANS}",
        "{AN} for every {FOR}",
        "your home for {ANS}",
        "{ANS} [and {ANS2}] all year round",
        "the home of {ANS}",
        "{ANS}, made with love",
    ],
    "title": [
        "the {A} {N} of {SEASON}",
        "the {N} and the {N2}",
        "{AN} in {SEASON}",
        "{ANS} and {ANS2}",
        "letters from the {LA} {LOC}",
        "a {SEASON} of {ANS}",
        "the {LA} {LOC}",
        "the {LOC} of {ANS}",
    ],
    "title!c": ["the last {N} of {SEASON}"],
    "suggestion": [
        "try to {ACT} [{TM}]",
        "why not {ACT} [{TM}]?",
        "how about we {ACTW} [{TM}]?",
        "you could {ACT} [{TM}].",
        "{ACT} [{TM}]",
        "maybe {ACT} [{TM}]",
        "this weekend, {ACT} and enjoy {ANS}",
    ],
    "greeting": [
        "good {DP}, {PA} {AUD}!",
        "hello, {PA} {AUD}!",
        "happy {DAY}, {AUD}!",
        "welcome to the {LA} {LOC}[, {AUD}]!",
        "greetings from the {LA} {LOC}!",
        "have a {DA} {DAY}[, {FRIENDS}]!",
        "hi {AUD}, welcome back!",
        "good {DP} from the {LA} {LOC}!",
        "good {DP}, {AUD}, let's {ACTW}!",
    ],
    "slogan": [
        "{ANS}, {ANS2}.",
        "less worry, more {NS}",
        "{ANS}, happy hearts",
        "all about {ANS}",
        "more {NS}, please",
        "{ANS}, every single day",
    ],
    "slogan!c": ["every {N} tells a story", "one {A} {N} at a time"],
    "caption": [
        "{ANS} {PL}",
        "{AN} {PL}",
        "just {AN} {PL}",
        "nothing beats {AN} [{TM}]",
        "just me and {AN}",
        "there is nothing quite like {AN} {PL}",
        "{ANS} and good company",
    ],
    "invitation": [
        "join us for {EV} [{WHEN}]",
        "come and {ACTW} with us [{TM}]!",
        "you're invited to {EV} [{WHEN}]",
        "save the date for {EV}",
        "let's {ACTW} [{TM}]!",
        "bring a friend to {EV}",
        "if you love {ANS}, you'll love {EV} [{WHEN}]",
        "we can't wait for {EV} {WHEN}",
    ],
    "motivation": [
        "today is a good day to {ACT}",
        "it's never too late to {ACT}",
        "small steps lead to {ANS}",
        "believe in yourself and {ACT}",
        "be brave enough to {ACT}",
        "make time to {ACT} [{TM}]",
        "you deserve a break, so {ACT}",
        "no matter how busy you are, make time to {ACT}",
        "don't wait, {ACT} [{TM}]",
        "life is better with {ANS}",
    ],
    "question": [
        "who wants to {ACT} [{TM}]?",
        "what makes {ANS} so special?",
        "ready for {EV} [{WHEN}]?",
        "is anything better than {ANS}?",
        "when did you last {ACT}?",
        "are you ready to {ACT} [{TM}]?",
        "do you love {ANS} too?",
    ],
    "question!c": ["what is your favorite {N}?"],
    "headline": [
        "{NUM} ways to {ACT}",
        "how to {ACT} [{TM}]",
        "why we love {ANS}",
        "a beginner's guide to {ANS}",
        "the story behind the {LA} {LOC}",
    ],
    "headline!c": ["the best {NS} {PL}", "{NUM} {A} {NS} to discover this {SEASON}"],
    "reminder": [
        "don't forget to {ACT} [{TM}]",
        "time to {ACT}!",
        "a quick reminder to {ACT} [{TM}]",
        "it's time for {EV}!",
        "a little reminder to enjoy {ANS}",
    ],
}

REPEATABLE = {
    "a",
    "an",
    "the",
    "and",
    "of",
    "to",
    "in",
    "on",
    "at",
    "by",
    "for",
    "with",
    "from",
    "you",
    "your",
    "our",
    "us",
    "we",
    "is",
    "it's",
}
FAMILIES = list(dict.fromkeys(f.split("!")[0] for f in TEMPLATES))
AN_EXCEPTIONS = {"one", "unique", "useful", "usual", "user", "hour", "honest"}  # sound wins


def plural(word: str) -> str:
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def fix_articles(text: str) -> str:
    """Write "a" or "an" by the next word: "a autumn" -> "an autumn", "an useful" -> "a useful"."""

    def choose(m: re.Match) -> str:
        vowel = (m.group(2)[0] in "aeiou") != (m.group(2) in AN_EXCEPTIONS)
        return ("an " if vowel else "a ") + m.group(2)

    return re.sub(r"\b(a|an) ([a-z']+)", choose, text)


def parse_topics(text: str) -> dict[str, dict]:
    """Parse the TOPICS block into {name: {"groups": [...], "places": [...], ...}}."""
    topics: dict[str, dict] = {}
    cur: dict = {}
    keys = {"p": "places", "a": "acts", "u": "aud", "e": "events"}
    for line in text.strip().splitlines():
        tag, _, body = line.partition(" ")
        if tag == "==":
            cur = topics[body] = {"groups": [], "skip": []}
        elif tag in ("g", "g@"):
            adjs, nouns = body.split(" / ")
            parsed = []
            for token in nouns.split():
                mass = token.startswith("*")
                token = token.lstrip("*").replace("_", " ")
                sing, _, plur = token.partition(":")
                parsed.append((sing, sing if mass else (plur or plural(sing)), mass))
            cur["groups"].append({"adjs": adjs.split(), "nouns": parsed, "loc": tag == "g@"})
        elif tag in keys:  # a tag may take several lines
            cur.setdefault(keys[tag], []).extend(body.split("|"))
        elif tag == "x":
            cur["skip"] = body.split()
        else:
            raise ValueError(f"bad line in TOPICS: {line!r}")
    return topics


class Picker:
    """Balanced choice: among the least-used options, pick one at random.

    Plain rng.choice would leave some words of the larger lists in only one or two
    phrases; choosing the least-used option first spreads every word over several phrases.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: dict[tuple, int] = {}

    def __call__(self, scope: str, options: list):
        least = min(self.used.get((scope, repr(o)), 0) for o in options)
        best = [o for o in options if self.used.get((scope, repr(o)), 0) == least]
        option = self.rng.choice(best)
        self.used[(scope, repr(option))] = least + 1
        return option


def noun_slots(pick: Picker, groups: list[dict], count_only: bool, suffix: str, form: str) -> dict:
    """Pick a noun of the topic, then an adjective of its group; return the {A} {N} {NS}
    {AN} {ANS} slots (with `suffix`).  Nouns are balanced per form ("sg" or "pl") so that
    both "loaf" and "loaves" turn up in several phrases."""
    pool = [g for g in groups if not g["loc"]]
    nouns = [(i, n) for i, g in enumerate(pool) for n in g["nouns"] if not (count_only and n[2])]
    gi, (sing, plur, mass) = pick(f"noun {form}", nouns)
    group = pool[gi]
    adj = pick(f"adj {group['nouns'][0]}", group["adjs"])
    an = f"{adj} {sing}" if mass else f"a {adj} {sing}"
    return {
        "A" + suffix: adj,
        "N" + suffix: sing,
        "NS" + suffix: plur,
        "AN" + suffix: an,
        "ANS" + suffix: f"{adj} {plur}",
        "_g" + suffix: id(group),
    }


def make_phrase(pick: Picker, topic: dict, family: str, template: str) -> str:
    """Fill one template; only the slots it uses are drawn, so balancing counts real uses."""
    rng, groups = pick.rng, topic["groups"]
    text = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1) if rng.random() < 0.5 else "", template)
    need = {field for _, field, _, _ in string.Formatter().parse(text) if field}
    slots: dict[str, str] = {}
    if need & {"A", "N", "NS", "AN", "ANS"}:
        form = "sg" if need & {"N", "AN"} else "pl"
        slots = noun_slots(pick, groups, family.endswith("!c"), "", form)
    if need & {"A2", "N2", "NS2", "AN2", "ANS2"}:
        form = "sg" if need & {"N2", "AN2"} else "pl"
        for _ in range(20):  # a second, different noun group with a different adjective
            second = noun_slots(pick, groups, False, "2", form)
            if second["_g2"] != slots["_g"] and second["A2"] != slots["A"]:
                break
        slots.update(second)
    loc_group = next(g for g in groups if g["loc"])
    draws = {
        "LA": lambda: pick("loc adj", loc_group["adjs"]),
        "LOC": lambda: pick("loc", loc_group["nouns"])[0],
        "ACT": lambda: pick("act", topic["acts"]),
        "ACTW": lambda: re.sub(r"\byour\b", "our", pick("act", topic["acts"])),
        "PL": lambda: pick("place", topic["places"]),
        "AUD": lambda: pick("aud", topic["aud"] + ["friends"]),
        "EV": lambda: pick("event", topic["events"]),
    }
    for key in sorted(need - slots.keys()):
        slots[key] = draws[key]() if key in draws else rng.choice(SHARED[key].split("|"))
    text = text.format(**slots)
    text = fix_articles(text)
    return re.sub(r"\s+([,.!?])", r"\1", re.sub(r"\s+", " ", text)).strip()


def repeats_a_word(phrase: str) -> bool:
    """True if a word other than a few small ones (or its plural) comes twice:
    "quiet rivers by the river", "try to try a new cafe"."""
    words = [w for w in re.findall(r"[a-z']+", phrase) if w not in REPEATABLE]
    stems = [w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words]
    return len(stems) != len(set(stems))


def generate(seed: int = 7, count: int = 6000, min_phrases: int = 5) -> list[str]:
    """Make `count` distinct phrases.  The last tenth are chosen to cover rare words: a new
    phrase is kept only if it holds a word found in fewer than `min_phrases` phrases so far
    (until that search gives up), so that nearly every word can be learned from several."""
    rng = random.Random(seed)
    pick = Picker(rng)
    topics = parse_topics(TOPICS)
    names = list(topics)
    seen: dict[str, None] = {}
    uses: dict[str, int] = {}
    rare: set[str] = set()
    attempts, free = 0, count - count // 10
    while len(seen) < count and attempts < count * 200:
        attempts += 1
        topic = topics[rng.choice(names)]
        family = rng.choice([f for f in FAMILIES if f not in topic["skip"]])
        options = [(f, t) for f in (family, family + "!c") for t in TEMPLATES.get(f, [])]
        phrase = make_phrase(pick, topic, *rng.choice(options))
        words = set(re.findall(r"[a-z']+", phrase))
        if phrase in seen or not 3 <= len(phrase.split()) <= 12 or repeats_a_word(phrase):
            continue
        if not re.fullmatch(r"[a-z' ,]+[.!?]?", phrase):
            continue
        if len(seen) >= free and rare and attempts < count * 100 and not words & rare:
            continue
        seen[phrase] = None
        for w in words:
            uses[w] = uses.get(w, 0) + 1
            (rare.add if uses[w] < min_phrases else rare.discard)(w)
    if len(seen) < count:
        raise SystemExit(f"only {len(seen)} distinct phrases could be made (asked {count})")
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--count", type=int, default=6000, help="number of distinct phrases")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("phrases.txt"))
    args = parser.parse_args()
    phrases = generate(args.seed, args.count)
    args.output.write_text("".join(p + "\n" for p in phrases), encoding="utf-8")
    print(f"wrote {len(phrases)} phrases to {args.output}")


if __name__ == "__main__":
    main()
