"""Outcomes coming back: pathology results and follow-ups, from a CSV file
(``sonocase outcomes import``) or as HL7 v2 ORU^R01 messages over MLLP."""
