"""Phone numbers: E.164 normalization, the renderings customers are looked up by, and matching in the store."""

from __future__ import annotations

import pytest

from commsync.connectors.phones import is_e164, region_is_known, split_scheme, to_e164, variants
from commsync.daemon import matching

US = "+14155550100"
UK = "+442079460018"


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+14155550100", None, US),
        ("+1 415-555-0100", None, US),
        ("+1 (415) 555-0100", "DE", US),  # an explicit country code wins over the region
        ("(415) 555-0100", "US", US),
        ("415.555.0100", "US", US),
        ("4155550100", "US", US),
        ("1-415-555-0100", "US", US),
        ("001 415 555 0100", "US", US),  # 00 is not the US call prefix, but people write it
        ("001 415 555 0100", "DE", US),
        ("011 1 415 555 0100", "US", US),
        ("whatsapp:+14155550100", None, US),
        ("tel:+1-415-555-0100", None, US),
        ("tel:+1-415-555-0100;ext=12", None, US),  # RFC 3966 parameters are not part of the number
        ("tel:415-555-0100;phone-context=+1", None, US),  # a local number whose context is a country code
        ("TEL:+44-20-7946-0018", "US", UK),
        (4155550100, "US", US),  # stored as a number by a spreadsheet import
        ("+44 (0)20 7946 0018", None, UK),
        ("020 7946 0018", "GB", UK),
        ("0044 20 7946 0018", "US", UK),
        ("442079460018", "US", UK),  # too long for the US: the digits carry their country code
        ("(415) 555-0100", None, None),  # no country code and no region: unreadable
        ("4155550100", None, None),
        ("Anonymous", "US", None),
        ("client:alice", "US", None),
        ("sip:alice@pbx.example", "US", None),
        ("+266696687", None, None),  # Twilio's "anonymous" caller id is not a possible number
        ("12", "US", None),
        ("", "US", None),
        (None, "US", None),
        ("+1 41", None, None),
        ("9" * 200, "US", None),
    ],
)
def test_to_e164(raw, region, expected):
    assert to_e164(raw, region) == expected


def test_a_national_number_reads_in_the_default_region():
    assert to_e164("030 1234567", "DE") == "+49301234567"
    # Japanese area code 011 is not the NANP international prefix when the region is JP.
    assert to_e164("011-234-5678", "JP") == "+81112345678"


def test_split_scheme_and_helpers():
    assert split_scheme("whatsapp:+1415") == ("whatsapp", "+1415")
    assert split_scheme(" WhatsApp : +1415 ") == ("whatsapp", "+1415")
    assert split_scheme("+1415") == (None, "+1415")
    assert is_e164(US) and not is_e164("4155550100") and not is_e164(None) and not is_e164("+0123456")
    assert region_is_known("us") and not region_is_known("XX")


@pytest.mark.parametrize("region", ["US", "GB", "DE", "JP", None])
@pytest.mark.parametrize("number", [US, UK, "+493012345678", "+81112345678", "+15551230000"])
def test_every_variant_reads_back_as_its_number(number, region):
    found = variants(number, region)
    assert number in found
    assert all(to_e164(v, region) == number for v in found)
    assert 20 < len(found) < 200


def test_variants_cover_the_common_formats():
    found = set(variants(US, "US"))
    for written in ["+1 415-555-0100", "+1 (415) 555-0100", "(415) 555-0100", "415-555-0100", "415.555.0100",
                    "4155550100", "14155550100", "1-415-555-0100", "001 415 555 0100", "+1.415.555.0100",
                    "whatsapp:+14155550100", "+14155550100"]:
        assert written in found, written


def test_national_forms_only_for_the_regions_country():
    assert "(415) 555-0100" in variants(US, "US")
    assert "(415) 555-0100" not in variants(US, "GB")
    assert "020 7946 0018" in variants(UK, "GB")
    assert "020 7946 0018" not in variants(UK, "US")
    assert "+44 (0)20 7946 0018" in variants(UK, "US")
    assert variants("not a number") == ()


def test_matching_reads_emails_and_numbers_and_skips_our_side():
    record = {
        "participants": [
            {"role": "from", "address": US, "internal": False},
            {"role": "to", "address": "+14155550199", "internal": True},
            {"role": "to", "address": "Anonymous", "internal": False},
            {"role": "to", "address": "bob@example.com", "internal": False},
        ]
    }
    assert matching.external_addresses(record) == {US, "bob@example.com"}
    query = matching.customer_filter(matching.external_addresses(record), "US")
    assert set(query) == {"$or"}
    emails, phones = query["$or"]
    assert "emails" in emails and "(415) 555-0100" in phones["phones"]["$in"] and 4155550100 in phones["phones"]["$in"]
    assert set(matching.customer_filter({US})) == {"phones"}

    by_key = matching.index_customers(
        [
            {"_id": "a", "phones": ["(415) 555-0100"]},
            {"_id": "b", "phones": "+1 415 555 0100", "emails": "Bob@Example.com"},
            {"_id": "c", "phones": [None, 42, "garbage"]},
        ],
        "US",
    )
    assert matching.assign(record, by_key) == ["a", "b"]
    assert matching.index_customers([{"_id": "a", "phones": ["(415) 555-0100"]}], None) == {}


def _call(rid, number, *, internal=False):
    return {
        "_id": rid,
        "channel": "call",
        "direction": "inbound",
        "occurred_at": __import__("records").T0,
        "participants": [
            {"role": "from", "address": number, "name": None, "internal": internal},
            {"role": "to", "address": "+14155550199", "name": None, "internal": True},
        ],
        "sources": [{"kind": "twilio", "source": "t", "account_sid": "AC" + "1" * 32, "list": "calls"}],
        "call": {"status": "completed", "duration_s": 60},
    }


async def test_the_store_matches_phones_and_emails_with_one_customer_query(store):
    from records import email_record

    def sent():
        return store.commands.count if store.commands is not None else 0

    store.default_region = "US"
    await store.customers.insert_many(
        [
            {"_id": "p1", "phones": ["(415) 555-0100"]},
            {"_id": "p2", "phones": ["+44 20 7946 0018"]},
            {"_id": "e1", "emails": ["Alice@Example.com"]},
            {"_id": "both", "emails": ["alice@example.com"], "phones": ["001 415 555 0100"]},
        ]
    )
    start = sent()
    await store.write_batch([_call("CA1", US), email_record("m1@x")])
    middle = sent()
    await store.write_batch(
        [_call(f"CA{i}x", US if i % 2 else UK) for i in range(200)] + [email_record(f"mm{i}@x", uid=i) for i in range(100)]
    )
    assert middle - start == sent() - middle  # one customer query for both kinds, whatever the batch
    assert (await store.records.find_one({"_id": "CA1"}))["customer_ids"] == ["both", "p1"]
    assert (await store.records.find_one({"_id": "CA0x"}))["customer_ids"] == ["p2"]
    assert (await store.records.find_one({"_id": "m1@x"}))["customer_ids"] == ["both", "e1"]
    hist = await store.history.find_one({"_id": "both"})
    assert hist["channels"]["call"]["count"] == 101 and hist["channels"]["email"]["count"] == 101
    assert hist["channels"]["call"]["talk_seconds"] == 101 * 60


@pytest.mark.parametrize("region", ["US", None])
def test_variants_cover_rfc3966_tel_uris(region):
    # vCard 4 and CRM imports store numbers as RFC 3966 URIs: visual separators, no spaces.
    found = set(variants("+12125550187", region))
    for written in ["tel:+1-212-555-0187", "tel:+1.212.555.0187", "tel:+12125550187", "tel:+1-(212)555-0187"]:
        assert written in found, written
    assert "tel:+44-20-7946-0018" in variants(UK, region)


async def test_a_customer_stored_as_a_tel_uri_is_matched(store):
    store.default_region = "US"
    await store.customers.insert_many(
        [{"_id": "vcard", "phones": ["tel:+1-212-555-0187"]}, {"_id": "uk", "phones": ["tel:+44-20-7946-0018"]}]
    )
    await store.write_batch([_call("CA-tel", "+12125550187"), _call("CA-uk", UK)])
    assert (await store.records.find_one({"_id": "CA-tel"}))["customer_ids"] == ["vcard"]
    assert (await store.records.find_one({"_id": "CA-uk"}))["customer_ids"] == ["uk"]
