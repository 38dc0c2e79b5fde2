"""Hand-written records in the format of the official Stage-1 CoT file (``Fine-R1-Stage1-data.json``).

The texts are short and made up; their SHAPES are those of the official release (404 LLaMA-Factory sharegpt records,
an R1 system prompt, ``<image>`` + question, a CoT inside ``<think>`` and ``<answer>NAME</answer>``):

* headed sections ("Analysis of Visual Features:", "Candidate Subcategories", "Comparison Process",
  "Final Prediction"), with or without colons, "---" rules, a repeated heading, a closing "Final Answer:" summary;
* heading-less CoTs that only carry the two sentences every record has, "The analysis of candidate
  subcategories:" (then an introduction, a numbered / bulleted / comma-separated list) and "The prediction is:";
* an analysis heading and nothing else;
* candidates with a Latin name, a description or a year in parentheses ("Painted Bunting (Passerina ciris)",
  "Chevrolet Malibu Sedan (2007)");
* image paths in the official Stage-1 image folders (``bird_200/images_train/...``, ``stanford_cars_train/images/``,
  ``dogs_120/image_train/train/...``, ``fgvc-aircraft-2013b-train/images/``, ``flower102_train/image/train/``,
  ``oxford-pet-train/train/``).

``CASES``: (name, record, expected) where expected holds the parsed ``options``, the start of ``analysis``, a
phrase of ``comparison`` (and one it must not contain), ``prediction``, ``super_category`` and the label the
filter's ground-truth check must accept.
"""
from __future__ import annotations

SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
    "</answer>"
)


def record(question: str, think: str, answer: str, image: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"content": "<image>" + question, "role": "user"},
                         {"role": "assistant", "content": f"<think>{think}</think>\n\n<answer>{answer}</answer>"}],
            "images": [image]}


# 1. Headed, colons, dash bullets, a closing "Final Answer:" summary with a comma list.
HEADED = (
    " Analysis of Visual Features:\nThe image shows a fighter jet with these features:\n\n"
    "1. Wings: a delta wing with canards.\n2. Tail: a single fin.\n\n"
    " Candidate Subcategories:\nThe aircraft is a modern fighter. Here are four candidates:\n\n"
    "- Eurofighter Typhoon\n- Dassault Rafale\n- Saab JAS 39 Gripen\n- F-16A/B\n\n"
    " Comparison Process:\n 1. Eurofighter Typhoon:\n   - Canards and a delta wing: match.\n"
    " 2. F-16A/B:\n   - No canards: does not match.\n\n"
    " Final Prediction:\nThe Eurofighter Typhoon matches best.\n\n"
    " Final Answer:\nA delta wing with canards.\nThe analysis of candidate subcategories: \n"
    "Eurofighter Typhoon, Dassault Rafale, Saab JAS 39 Gripen, F-16A/B\n\n"
    "The Typhoon has canards, the F-16 does not.\nThe prediction is: The aircraft is a Eurofighter Typhoon.\n"
)

# 2. Headed without colons, "---" rules, the heading repeated, the candidate sentence inside the section, numbered
#    items "Name (Full name): description".
HEADED_RULES = (
    " Analysis of the Airplane in the Image\n\n Visual Features Observed:\n1. Tail: a T-tail.\n"
    "2. Engines: three, at the rear.\n\n---\n\n Candidate Subcategories\n\nBased on the features, the airplane is a "
    "medium airliner. Here are four candidates:\n\n Candidate Subcategories\nThe analysis of candidate subcategories: \n"
    "1. Tu-154 (Tupolev Tu-154): a trijet with a T-tail.\n2. Boeing 727-200 (Boeing 727): a trijet too.\n"
    "3. MD-80 (McDonnell Douglas MD-80): two engines.\n4. Fokker 100 (Fokker F28 Mk 0100): two engines.\n\n\n---\n\n"
    " Comparison Process\n\n1. Tu-154 vs. MD-80:\n   - Three engines against two.\n\n---\n\n"
    " Final Prediction\n\nThe airplane matches the Tu-154.\n\nThe prediction is: Tu-154"
)

# 3. Heading-less: introduction paragraph, numbered list with descriptions, two blank lines, dash comparison.
HEADINGLESS = (
    "The image shows an aircraft with the following visual features:\n\n1. Twin turboprops on high wings.\n"
    "2. A T-tail.\n\nThese features suggest a regional turboprop.\n\n"
    "The analysis of candidate subcategories: \nBased on the visual features, the candidate subcategories "
    "(twin-engine turboprop airliners) are:\n\n1. ATR-42: high wings and a T-tail.\n"
    "2. Dash 8-100 (Bombardier): high wings and a T-tail, a longer nose.\n3. Saab 340: smaller.\n"
    "4. Fokker 50: a rounder nose.\n\n\n- ATR-42: the short fuselage matches the image.\n  \n"
    "- Dash 8-100: the nose is more angular than in the image.\n\n"
    "From the comparison, the ATR-42 stands out.\n\nThe prediction is: The aircraft is most likely an ATR-42.\n"
)

# 4. Heading-less: a short numbered list, a plain paragraph, then dash comparison; names without the year.
HEADINGLESS_PLAIN = (
    "The image shows a red sedan with several distinct exterior features:\n\n1. Front Grille: chrome bars.\n\n"
    "2. Headlights: rectangular.\n\n\nThe analysis of candidate subcategories: \nBased on the visual features, the "
    "following candidate subcategories (models) could be considered:\n1. Hyundai Elantra Sedan 2007\n"
    "2. Hyundai Sonata Sedan 2012\n3. Hyundai Accent Sedan 2012\n4. Hyundai Tiburon Coupe 2008\n\n"
    "These models were part of Hyundai's lineup.\n\n\n- Hyundai Elantra Sedan 2007: compact, matches the grille.\n\n"
    "- Hyundai Tiburon Coupe 2008: a coupe, not a sedan.\n\n"
    "The prediction is: The car in the image is most likely a Hyundai Elantra Sedan 2007.\n"
)

# 5. Heading-less with the candidates as one comma-separated line.
HEADINGLESS_COMMAS = (
    "The dog has a tall, slender build and a silky grey coat.\n\nThe analysis of candidate subcategories: \n"
    "Scottish Deerhound, Irish Wolfhound, Great Dane, Greyhound\n\n"
    "The Scottish Deerhound is more slender than the Irish Wolfhound and silkier than the Greyhound.\n"
    "The prediction is: Scottish Deerhound\n"
)

# 6. Only an analysis heading; bulleted candidates with descriptions; the comparison as plain text.
ANALYSIS_HEADING_ONLY = (
    " Analysis of the Pet's Visible Features:\nThe image shows a cat with a light coat and dark points.\n\n"
    "The analysis of candidate subcategories: \n- Siamese: light body, dark points, blue eyes.\n"
    "- Birman: long fur and white paws.\n- Ragdoll: long fur, larger.\n\n\n"
    "The cat has short fur, which rules out the Birman and the Ragdoll; the points and blue eyes match the Siamese.\n\n"
    "The prediction is: Siamese"
)

# 7. Headed; candidates with Latin names, in the section and in the candidate sentence.
LATIN = (
    " Analysis of the Bird's Physical Appearance\nThe bird has a blue head, a red chest and green wings.\n\n"
    " Candidate Subcategories\nThe bird is a colourful songbird. The candidates are:\n\n"
    "- Painted Bunting (Passerina ciris): blue head, red chest, green back.\n"
    "- Indigo Bunting (Passerina cyanea): blue all over.\n- Lazuli Bunting (Passerina amoena): a white wing bar.\n\n"
    "The analysis of candidate subcategories: \n1. Painted Bunting (Passerina ciris)\n"
    "2. Indigo Bunting (Passerina cyanea)\n3. Lazuli Bunting (Passerina amoena)\n\n\n"
    " Comparison Process\n- Painted Bunting vs. Indigo Bunting: only the Painted Bunting has a red chest.\n\n"
    " Final Prediction\nThe bird is a Painted Bunting.\n\nThe prediction is: Painted Bunting (Passerina ciris)\n"
)

# 8. Headed; a year in parentheses; the prediction sentence right before </think>.
YEAR = (
    " Analysis of the Car's Body Features\n\n Shape and Design\n1. Grille: a dual-port grille.\n\n---\n\n"
    " Candidate Subcategories\n\nThe car is a mid-size sedan. Here are the candidates:\n\n"
    "The analysis of candidate subcategories: \n1. Chevrolet Malibu Sedan (2007): a dual-port grille.\n"
    "2. Chevrolet Impala Sedan (2007): boxier.\n3. Chevrolet Cobalt Sedan (2007): smaller.\n\n\n---\n\n"
    " Comparison Process\n\n Comparison Between Candidates\n1. Chevrolet Malibu Sedan (2007):\n   - The grille matches.\n"
    "\n2. Chevrolet Impala Sedan (2007):\n   - Boxier than the car in the image.\n\n---\n\n Final Prediction\n\n"
    "The car is most consistent with the Chevrolet Malibu Sedan (2007).\n\n"
    "The prediction is: Chevrolet Malibu Sedan (2007)"
)

# 9. Headed "Candidate Subcategories" whose list is numbered, blank-line separated, with indented sub-points; the
#    prediction sentence under the "Final Prediction" heading.
SUBPOINTS = (
    " Analysis of the Flower's Observable Traits\n\n Color:\n- White petals and purple sepals.\n\n---\n\n"
    " Candidate Subcategories\n\nThe flower is a columbine. The candidates are:\n\n Options:\n"
    "1. Aquilegia vulgaris (Common Columbine)  \n   - Blue or pink sepals.\n\n"
    "2. Aquilegia x hybrida (Garden Columbine)  \n   - Many colour combinations.\n\n"
    "3. Aquilegia chrysantha (Golden Columbine)  \n   - Yellow sepals.\n\n---\n\n Comparison Process\n\n"
    " Comparing the Candidates:\n1. Aquilegia vulgaris:\n   - Solid colours, no match.\n\n---\n\n"
    " Final Prediction\nThe prediction is: Aquilegia x hybrida (Garden Columbine)\n"
)

# 10. Heading-less; bulleted candidates, then (after two blank lines) bulleted "A vs. B" comparison.
HEADINGLESS_BULLETS = (
    "The image shows a small black-and-tan dog with long ears.\n\nThe analysis of candidate subcategories: \n"
    "- Gordon Setter: black and tan, long ears.\n- Black And Tan Coonhound: black and tan, longer ears.\n\n\n"
    "- Gordon Setter vs. Black And Tan Coonhound: the feathered coat matches the setter.\n\n"
    "The prediction is: Gordon Setter\n"
)

CASES = [
    ("headed", record("What is the name of the airplane in this image?", HEADED, "Eurofighter Typhoon",
                      "fgvc-aircraft-2013b-train/images/1838247.jpg"),
     {"options": ["Eurofighter Typhoon", "Dassault Rafale", "Saab JAS 39 Gripen", "F-16A/B"],
      "analysis": "The image shows a fighter jet", "comparison": "No canards: does not match.",
      "not_in_comparison": "Final", "prediction": "Eurofighter Typhoon", "super_category": "aircraft",
      "label": "Eurofighter Typhoon"}),
    ("headed_rules", record("Can you name the airplane model shown in this image?", HEADED_RULES, "Tu-154",
                            "fgvc-aircraft-2013b-train/images/0758130.jpg"),
     {"options": ["Tu-154 (Tupolev Tu-154)", "Boeing 727-200 (Boeing 727)", "MD-80 (McDonnell Douglas MD-80)",
                  "Fokker 100 (Fokker F28 Mk 0100)"],
      "analysis": "Visual Features Observed:", "comparison": "Three engines against two.",
      "not_in_comparison": "---", "prediction": "Tu-154", "super_category": "aircraft", "label": "Tu-154"}),
    ("headingless", record("What type of airplane does this image show?", HEADINGLESS, "ATR-42",
                           "fgvc-aircraft-2013b-train/images/0874829.jpg"),
     {"options": ["ATR-42", "Dash 8-100 (Bombardier)", "Saab 340", "Fokker 50"],
      "analysis": "The image shows an aircraft", "comparison": "- ATR-42: the short fuselage matches",
      "not_in_comparison": "The prediction is", "prediction": "ATR-42", "super_category": "aircraft",
      "label": "ATR-42"}),
    ("headingless_plain", record("Can you identify the car model based on this image?", HEADINGLESS_PLAIN,
                                 "Hyundai Elantra Sedan 2007", "stanford_cars_train/images/06842.jpg"),
     {"options": ["Hyundai Elantra Sedan 2007", "Hyundai Sonata Sedan 2012", "Hyundai Accent Sedan 2012",
                  "Hyundai Tiburon Coupe 2008"],
      "analysis": "The image shows a red sedan", "comparison": "a coupe, not a sedan",
      "not_in_comparison": "The prediction is", "prediction": "Hyundai Elantra Sedan 2007",
      "super_category": "car", "label": "Hyundai Elantra Sedan 2007"}),
    ("headingless_commas", record("What species is represented by this dog?", HEADINGLESS_COMMAS,
                                  "Scottish Deerhound",
                                  "dogs_120/image_train/train/n02092002-Scottish_deerhound/n02092002_1592.jpg"),
     {"options": ["Scottish Deerhound", "Irish Wolfhound", "Great Dane", "Greyhound"],
      "analysis": "The dog has a tall, slender build", "comparison": "more slender than the Irish Wolfhound",
      "not_in_comparison": "The prediction is", "prediction": "Scottish Deerhound", "super_category": "dog",
      "label": "Scottish Deerhound"}),
    ("analysis_heading_only", record("What species does this image show?", ANALYSIS_HEADING_ONLY, "Siamese",
                                     "oxford-pet-train/train/Siamese_161.jpg"),
     {"options": ["Siamese", "Birman", "Ragdoll"], "analysis": "The image shows a cat",
      "comparison": "rules out the Birman", "not_in_comparison": "The analysis of candidate",
      "prediction": "Siamese", "super_category": "pet", "label": "Siamese"}),
    ("latin", record("What is the proper name of this bird?", LATIN, "Painted Bunting",
                     "bird_200/images_train/016.Painted_Bunting/Painted_Bunting_0056_16599.jpg"),
     {"options": ["Painted Bunting (Passerina ciris)", "Indigo Bunting (Passerina cyanea)",
                  "Lazuli Bunting (Passerina amoena)"],
      "analysis": "The bird has a blue head", "comparison": "only the Painted Bunting has a red chest",
      "not_in_comparison": "Final", "prediction": "Painted Bunting", "super_category": "bird",
      "label": "Painted Bunting"}),
    ("year", record("What is the car type shown in this image?", YEAR, "Chevrolet Malibu Sedan 2007",
                    "stanford_cars_train/images/04080.jpg"),
     {"options": ["Chevrolet Malibu Sedan (2007)", "Chevrolet Impala Sedan (2007)", "Chevrolet Cobalt Sedan (2007)"],
      "analysis": "Shape and Design", "comparison": "The grille matches.", "not_in_comparison": "most consistent",
      "prediction": "Chevrolet Malibu Sedan 2007", "super_category": "car", "label": "Chevrolet Malibu Sedan 2007"}),
    ("subpoints", record("Identify the flower in this image by name.", SUBPOINTS, "columbine",
                         "flower102_train/image/train/image_02581.jpg"),
     {"options": ["Aquilegia vulgaris (Common Columbine)", "Aquilegia x hybrida (Garden Columbine)",
                  "Aquilegia chrysantha (Golden Columbine)"],
      "analysis": "Color:", "comparison": "Solid colours, no match.", "not_in_comparison": "The prediction is",
      "prediction": "columbine", "super_category": "flower", "label": "Aquilegia x hybrida"}),
    ("headingless_bullets", record("Identify the dog species in this image.", HEADINGLESS_BULLETS, "Gordon Setter",
                                   "dogs_120/image_train/train/n02101006-Gordon_setter/n02101006_1.jpg"),
     {"options": ["Gordon Setter", "Black And Tan Coonhound"], "analysis": "The image shows a small black-and-tan dog",
      "comparison": "Gordon Setter vs. Black And Tan Coonhound", "not_in_comparison": "The prediction is",
      "prediction": "Gordon Setter", "super_category": "dog", "label": "Gordon Setter"}),
]

RECORDS = [rec for _, rec, _ in CASES]
