"""The caption grammar over all 483 dev captions, the tolerant extractor, contradictions and strata."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.captions import (
    CaptionAttributes,
    attribute_differences,
    attributes_of,
    contradictions,
    extract_attributes,
    image_strata,
    parse_caption,
    render_caption,
)
from harness.prompts import shipped_dev_captions

CAPTIONS = shipped_dev_captions()


def test_shipped_list_is_the_483_dev_captions(dev_dir):
    from harness.data import load_devset

    assert len(CAPTIONS) == len(set(CAPTIONS)) == 483
    assert CAPTIONS == load_devset(dev_dir).unique_prompts()


def test_every_dev_caption_parses_and_round_trips():
    templates = Counter()
    for c in CAPTIONS:
        a = parse_caption(c)
        templates[a.template] += 1
        assert render_caption(a) == c
    assert set(templates) == {"located", "colours", "contains", "count", "polyp_sizes", "polyp_size", "paris",
                              "none", "paris_multi", "not_contains", "procedure", "colour_findings"}
    assert templates["located"] == 319 and templates["colours"] == 99


def test_extractor_agrees_with_parser_on_every_dev_caption():
    """The tolerant extractor and the strict grammar read the same commitments from each caption."""
    for c in CAPTIONS:
        assert extract_attributes(c) == attributes_of(parse_caption(c)), c


def test_parsed_values_and_typos():
    a = parse_caption("Generate an image with an an anatomical landmark located in the center, upper-center and "
                      "lower-rigth.")
    assert a.located == "anatomical landmark" and a.locations == ("center", "upper-center", "lower-right")
    assert render_caption(a).endswith("lower-rigth.")  # the typo belongs to the landmark template
    a = parse_caption("Generate an image containing polyp snareandtube.")
    assert a.instruments == ("polyp snare", "tube") and a.findings == ()
    a = parse_caption("Generate an image with polyps of size < 5mm, 5-10mm and 11-20mm.")
    assert a.sizes == ("<5mm", "5-10mm", "11-20mm") and a.findings == ("polyp",)
    a = parse_caption("Generate polyps of type paris is and paris iia.")
    assert a.paris == ("is", "iia")
    a = parse_caption("Generate an image with 16 polyps.")
    assert a.counts == (("polyp", 16),)
    a = parse_caption("Generate an image with an abnormality with the colors ink, white and brown.")
    assert a.colours == ("ink", "white", "brown")  # verbatim phrase; the extractor reads "ink" as pink
    assert extract_attributes(render_caption(a))["colours"] == {"pink", "white", "brown"}
    assert parse_caption("Generate an image with no instruments.").negations == ("instrument",)
    assert parse_caption("Generate an image from a gastroscopy procedure.").procedure == "gastroscopy"


def test_rendering_new_values_follows_the_templates():
    a = CaptionAttributes(template="count", counts=(("instrument", 2),))
    assert render_caption(a) == "Generate an image with 2 instruments."
    a = CaptionAttributes(template="located", located="instrument", locations=("lower-right", "center"))
    assert render_caption(a) == "Generate an image with an an instrument located in the lower-right and center."
    assert parse_caption(render_caption(a)) == a


@pytest.mark.parametrize("text", [
    "Generate an image with 1 polyps.",  # template never pluralises a count of 1
    "Generate an image with an abnormality with the color pink and red.",  # singular with a list
    "Generate an image containing a unicorn.",
    "Generate an image with an an abnormality located in the far-left.",
    "generate an image containing a polyp.",  # case matters: the test prompts are verbatim dev captions
    "Create an image containing a polyp.",
    "",
])
def test_non_template_text_is_rejected(text):
    with pytest.raises(ValueError, match="no known template"):
        parse_caption(text)


PRESERVING = [
    ("Generate an image with 2 polyps.", "Create a picture showing two polyps."),
    ("Generate an image with no instruments.", "Produce an image without any instruments."),
    ("Generate an image with an an abnormality located in the center, upper-left and lower-right.",
     "Create an image where an abnormality sits in the centre, the upper left and the bottom right."),
    ("Generate an image with a polyp of size < 5mm.", "Create an image of a polyp smaller than 5 mm."),
    ("Generate an image with a polyp of size >20mm.", "Show a polyp larger than 20 millimeters."),
    ("Generate an image with polyps of size 5-10mm and 11-20mm.", "Polyps measuring 5 to 10 mm and 11-20 mm."),
    ("Generate an image not containing a green/black box artefact.", "An image free of the green and black box artifact."),
    ("Generate an image with an abnormality with the colors pink, red and white.",
     "An image with an abnormality coloured pink, red, and white."),
    ("Generate polyps of type paris is and paris iia.", "Generate polyps of Paris types Is and IIa."),
    ("Generate an image from a colonoscopy procedure.", "Create a colonoscopic image."),
    ("Generate an image not containing text.", "Generate an image that does not contain any text."),
    ("Generate an image containing biopsy forcepsandtube.", "An image showing biopsy forceps and a tube."),
]

CHANGING = [
    ("Generate an image with 2 polyps.", "Create a picture showing three polyps.", "numbers"),
    ("Generate an image with no instruments.", "An image with an instrument.", "negations"),
    ("Generate an image with an an abnormality located in the upper-left.", "An abnormality in the upper right.",
     "locations"),
    ("Generate an image with a polyp of size < 5mm.", "A polyp of 5-10 mm.", "sizes"),
    ("Generate an image with an abnormality with the colors pink and red.", "A pink and white abnormality.", "colours"),
    ("Generate an image containing a green/black box artefact.", "An image without the green/black box.",
     "findings"),
    ("Generate an image from a colonoscopy procedure.", "An image from a gastroscopy.", "procedure"),
    ("Generate a polyp of type paris ip.", "Generate a polyp of type paris is.", "paris"),
    ("Generate an image containing polyp snare.", "An image containing biopsy forceps.", "instruments"),
]


@pytest.mark.parametrize("original,paraphrase", PRESERVING)
def test_paraphrases_that_keep_every_attribute(original, paraphrase):
    assert attribute_differences(original, paraphrase) == {}


@pytest.mark.parametrize("original,paraphrase,attr", CHANGING)
def test_paraphrases_that_change_an_attribute(original, paraphrase, attr):
    assert attr in attribute_differences(original, paraphrase)


def test_box_colours_are_not_abnormality_colours():
    e = extract_attributes("Generate an image containing a green/black box artefact.")
    assert e["colours"] == frozenset() and e["findings"] == {"green/black box artefact"}


def test_contradictions():
    ok = ["Generate an image with no instruments.", "Generate an image containing a polyp.",
          "Generate an image with 1 polyp.", "Generate an image with an an abnormality located in the center."]
    assert contradictions(ok) == []
    c = contradictions(ok + ["Generate an image with an an instrument located in the lower-right."])
    assert c == ['"no instruments" vs "Generate an image with an an instrument located in the lower-right."']
    c = contradictions(["Generate an image with no polyps.", "Generate an image with 2 polyps.",
                        "Generate an image with no findings.", "Generate an image not containing text.",
                        "Generate an image containing text.", "Generate an image from a colonoscopy procedure.",
                        "Generate an image from a gastroscopy procedure.", "Generate an image with 1 polyp."])
    assert any(x.startswith('"no polyps" vs') and "2 polyps" in x for x in c)
    assert any(x.startswith('"no findings" vs') for x in c)
    assert '"not containing text" vs "containing text"' in c
    assert "both colonoscopy and gastroscopy procedure" in c
    assert "different polyp counts: 1, 2" in c
    # "no findings" beside an instrument is NOT a contradiction in this data (instruments are not findings)
    assert contradictions(["Generate an image with no findings.", "Generate an image containing tube."]) == []


def test_contradictions_in_the_real_dev_set(dev_dir):
    """The 18 images that say "no instruments" and "an instrument located ..." are all found (plus one that says
    "no instruments" and "containing polyp snare")."""
    from harness.data import load_devset

    by = load_devset(dev_dir).captions_by_image()
    located = {f for f, caps in by.items() if "Generate an image with no instruments." in caps
               and any("an an instrument located" in c for c in caps)}
    assert len(located) == 18
    flagged = {f for f, caps in by.items() if any(x.startswith('"no instruments"') for x in contradictions(caps))}
    assert located <= flagged and len(flagged) == 19
    (extra,) = flagged - located
    assert "Generate an image containing polyp snare." in by[extra]


def test_image_strata():
    assert image_strata(["Generate an image from a colonoscopy procedure.",
                         "Generate an image containing a polyp."]) == "colonoscopy/polyp"
    assert image_strata(["Generate an image from a gastroscopy procedure.", "Generate an image containing the z-line.",
                         "Generate an image containing oesophagitis."]) == "gastroscopy/oesophagitis"
    assert image_strata(["Generate an image from a colonoscopy procedure.",
                         "Generate an image containing tube."]) == "colonoscopy/instrument"
    assert image_strata(["Generate an image containing text."]) == "unknown/none"
