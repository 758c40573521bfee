"""Generated mail corpora for the benchmarks (deterministic, never copied from real mail).

Two corpora, each a function ``(n, seed) -> bytes`` (wire format, CRLF):

* ``small``: :func:`typical_message`, the original benchmark corpus: about
  4 KiB per message, a few kinds, little variety. Kept so that old and new
  numbers stay comparable.
* ``business``: :func:`business_message`, closer to a company mailbox. Sizes
  are drawn first: log-normal around 4.5 KB for most mail, plus a heavy tail
  (about 4% of 40-200 KB, mostly attachments), mean about 9 KB. Then a
  kind that fits the size: short notes, Outlook-style multipart/alternative
  with its Word HTML, replies that quote long threads (Gmail ``>`` nesting or
  Outlook's header blocks), HTML-only and multipart/alternative newsletters
  with big inline CSS, attachments (PDF, PNG/JPEG, DOCX/XLSX: plausible
  bytes, base64), signature logos in multipart/related, forwarded
  ``message/rfc822`` parts. About 15% are written in a legacy charset
  (ISO-8859-x, Windows-125x, KOI8-R, Shift_JIS, ISO-2022-JP, GB2312) with
  RFC 2047 encoded-word headers; some more in UTF-8 with encoded words.
  Realistic From/To/Cc mixes, Message-IDs of several mailers and
  In-Reply-To/References chains.

:func:`business_sample` returns the kind and charset along with the bytes
(``tests/test_bench_corpus.py`` checks the shape of the corpus with them).
"""

from __future__ import annotations

import base64
import io
import math
import quopri
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime
from functools import lru_cache

OWN_DOMAIN = "ourco.example"
OWN_ADDRESS = f"sales@{OWN_DOMAIN}"

# --------------------------------------------------------------------------- the small corpus

_RELAYS = ["mx1.example.net", "mail-eu1.example.com", "relay.provider.example", "smtp.partner.example"]
_NON_ASCII = [
    # (display name, subject, paragraph)
    ("Jürgen Weiß", "Lieferung für Größe XL – Bestätigung",
     "Sehr geehrte Damen und Herren, die Lieferung über 12 Paletten trifft voraussichtlich am Donnerstag ein. "
     "Bitte bestätigen Sie die Übernahme; Rückfragen gern an unser Büro in München."),
    ("Élodie Lefèvre", "Réf. commande n° 4711 — délai de livraison",
     "Bonjour, pourriez-vous confirmer la date de livraison prévue ? Le règlement sera effectué à réception "
     "de la facture. Très cordialement, l'équipe achats."),
    ("Søren Ødegård", "Tilbud på årlig fornyelse",
     "Hei, takk for tilbudet. Vi ønsker å fornye avtalen for ett år til, men prisen må justeres før vi signerer."),
    ("山田 太郎", "お見積もりのご依頼（至急）",
     "いつもお世話になっております。添付の仕様にてお見積もりをお願いできますでしょうか。納期は来月末を希望します。"),
    ("Zoë Brontë-Núñez", "Invoice ✓ paid – thanks!",
     "Hi — the invoice was paid this morning; you should see it in 2–3 days. Cheers, Zoë"),
]


def _trace_headers(rng: random.Random, n: int, when: datetime) -> list[tuple[str, str]]:
    """Transport headers real mail carries (Received chain, DKIM, ...): about 1 KB."""
    headers = []
    for hop in range(rng.randint(2, 4)):
        relay = rng.choice(_RELAYS)
        stamp = format_datetime(when + timedelta(seconds=hop))
        headers.append((
            "Received",
            f"from {relay} ({relay} [192.0.2.{rng.randint(1, 254)}])\r\n\tby mx.{OWN_DOMAIN} (Postfix) "
            f"with ESMTPS id {rng.getrandbits(40):010X}\r\n\tfor <sales@{OWN_DOMAIN}>; {stamp}",
        ))
    sig = base64.b64encode(rng.randbytes(128)).decode()
    headers.append((
        "DKIM-Signature",
        "v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel1; h=from:to:subject:date:message-id;\r\n\t"
        f"bh={base64.b64encode(rng.randbytes(32)).decode()};\r\n\tb={sig[:76]}\r\n\t{sig[76:]}",
    ))
    headers.append(("Authentication-Results", f"mx.{OWN_DOMAIN}; dkim=pass header.d=example.com; spf=pass; dmarc=pass"))
    headers.append(("X-Mailer", rng.choice(["Microsoft Outlook 16.0", "Apple Mail (2.3774)", "Thunderbird 128.3"])))
    if rng.random() < 0.3:
        headers.append(("List-Unsubscribe", f"<mailto:unsubscribe-{n}@lists.example.com>, <https://example.com/u/{n}>"))
    return headers


def typical_message(n: int, seed: int = 0) -> bytes:
    """One message of the small corpus, deterministic for (n, seed).

    About 4 KB on average (with ~1 KB of transport headers: Received, DKIM,
    ...); 30% with an HTML alternative, 10% with a small attachment, 15% with
    non-ASCII names/subjects/bodies (half of those 8-bit), 35% replies.
    """
    from mailgen import message  # the project's test message generator

    rng = random.Random(n * 7919 + seed)
    html = rng.random() < 0.30
    attachment = rng.randbytes(rng.randint(2_000, 12_000)) if rng.random() < 0.10 else None
    when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=7 * n)
    sender = rng.choice(["alice@example.com", "bob@customer.example", "orders@bigcorp.example", "j.smith@partner.example"])
    reply_to = f"<msg-{n - 1}-0@mail.example.com>" if n and rng.random() < 0.35 else None
    if rng.random() < 0.15:
        name, subject, para = rng.choice(_NON_ASCII)
        msg = EmailMessage()
        msg["From"] = f"{name} <{sender}>"
        msg["To"] = f"Sales <sales@{OWN_DOMAIN}>"
        msg["Subject"] = subject
        msg["Date"] = format_datetime(when)
        msg["Message-ID"] = f"<msg-{n}-{rng.randrange(10**9)}@mail.example.com>"
        if reply_to:
            msg["In-Reply-To"] = msg["References"] = reply_to
        body = "\n\n".join([para] * rng.randint(2, 6))
        # Half as raw 8-bit UTF-8 (RFC 6532 style senders), half as the default (base64/QP).
        msg.set_content(f"{body}\n\n-- \n{name}\n", **({"cte": "8bit"} if rng.random() < 0.5 else {}))
        if html:
            msg.add_alternative(f"<html><body><p>{body}</p><p>{name}</p></body></html>", subtype="html")
        if attachment is not None:
            msg.add_attachment(attachment, maintype="application", subtype="pdf", filename=f"Rechnung-{n}-Größe.pdf")
        raw = msg.as_bytes()
    else:
        raw = message(
            n,
            sender=sender,
            to=f"sales@{OWN_DOMAIN}",
            date=when,
            in_reply_to=reply_to,
            html=html,
            attachment=attachment,
            seed=n * 31 + seed,
        )
    trace = "".join(f"{k}: {v}\r\n" for k, v in _trace_headers(rng, n, when)).encode()
    # Wire format: CRLF line endings, transport headers first (as an MTA adds them).
    return trace + raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------- the business corpus: shape

# Share of the heavy tail and its size range (bytes); the rest is log-normal.
HEAVY_SHARE = 0.042
HEAVY_RANGE = (40_000, 200_000)
BODY_MEDIAN = 4_400
BODY_SIGMA = 0.55
BODY_RANGE = (1_400, 38_000)
# Messages (kinds permitting) in a legacy charset, and in UTF-8 with non-ASCII text.
LEGACY_SHARE = 0.15
UTF8_FOREIGN_SHARE = 0.10

# kind: (weight among the messages it fits, smallest size it can be made at)
_KINDS: dict[str, tuple[float, int]] = {
    "plain": (30, 0),
    "alternative": (22, 3_600),
    "reply_thread": (20, 2_400),
    "attachment": (22, 5_000),
    "related": (16, 6_000),
    "forward": (5, 3_000),
    "newsletter_html": (30, 6_500),
    "newsletter_alt": (30, 7_500),
}
# The heavy tail: mostly attachments.
_HEAVY_KINDS = {"attachment_large": 70, "newsletter_html": 8, "newsletter_alt": 7, "forward": 15}
KINDS = sorted({*_KINDS, *_HEAVY_KINDS})

# --------------------------------------------------------------------------- words

_FIRST = ["Anna", "Thomas", "Sarah", "Michael", "Laura", "David", "Julia", "Peter", "Emma", "James", "Maria", "Daniel",
          "Sophie", "Lukas", "Olivia", "Mark", "Nina", "Robert", "Claire", "Jan", "Eva", "Paul", "Hannah", "Chris"]
_LAST = ["Smith", "Miller", "Meyer", "Schmidt", "Johnson", "Brown", "Fischer", "Wagner", "Taylor", "Clarke", "Becker",
         "Hoffmann", "Davies", "Evans", "Wilson", "Schulz", "Roberts", "Walker", "Koch", "Wright", "Richter", "Green"]
_COMPANIES = ["bigcorp", "mueller-logistik", "acme-industrial", "nordwind-trading", "castellan", "bluefield-foods",
              "helix-medical", "primeparts", "sunrise-retail", "vertex-consulting", "orbis-freight", "lumen-energy",
              "kestrel-systems", "atlas-packaging", "meridian-hotels", "quarry-stone", "pinecrest-bank", "delta-print"]
_TLDS = ["example", "example.com", "example.net", "example.org", "test"]
_INTERNAL = ["a.meier", "j.doe", "support", "billing", "k.wong", "m.rossi", "accounts", "t.berg"]
_PRODUCTS = ["pallet racks", "conveyor belts", "spare parts kit", "annual maintenance contract", "label printers",
             "server licences", "cold-storage units", "forklift batteries", "safety gloves", "packaging film",
             "LED fixtures", "hydraulic pumps", "cloud backup plan", "training workshop", "office chairs"]
_SUBJECTS = ["Quote {q} for {p}", "Order {q} confirmation", "Invoice {q} overdue", "Delivery schedule for {p}",
             "Question about {p}", "Contract renewal {y}", "Meeting next {d}", "Updated pricing for {p}",
             "Ticket #{q}: {p} not working", "Shipment {q} delayed", "Samples of {p}", "Payment reminder {q}",
             "Visit to your site on {d}", "Framework agreement {y}", "Complaint regarding order {q}"]
_NEWS_SUBJECTS = ["Your {d} update: {k}% off {p}", "New arrivals: {p} and more", "Webinar invitation: {p} in {y}",
                  "Last chance: {p} offer ends {d}", "Newsletter {k}/{y}: trends in {p}"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_SENTENCES = [
    "Thank you for your message and the quick turnaround on the {p}.",
    "Please find attached our updated offer for {n} units of {p}.",
    "Could you confirm the delivery date for order {q} by {d}?",
    "As discussed on the phone, we would like to move the installation to {d}.",
    "The invoice {q} is still open; payment terms were 30 days net.",
    "Our warehouse team reported that {n} cartons arrived damaged.",
    "We have reviewed the contract and have a few comments on clause {c}.",
    "The price of the {p} has gone up by {k}% since the last order.",
    "I am out of the office until {d}; my colleague will handle urgent requests.",
    "Can we schedule a short call on {d} to go through the open points?",
    "Attached is the signed purchase order {q} for your records.",
    "The technician will be on site between 9 and 11 am on {d}.",
    "Please note our new bank details for all payments from next month.",
    "We still have not received the credit note for the returned {p}.",
    "Our auditors need the certificates of conformity for batch {q}.",
    "Let me know if the revised drawings work for your engineering team.",
    "The shipment left our depot this morning and should arrive on {d}.",
    "We would like to add {n} more units of {p} to the existing order.",
    "Regarding your ticket {q}: the firmware update should fix the issue.",
    "Happy to send samples of the {p} if that helps your decision.",
    "The minutes of yesterday's meeting are below; please correct anything I missed.",
    "Our budget for the next quarter has been approved, so we can proceed.",
]
_GREETINGS = ["Hello {f},", "Hi {f},", "Dear {f},", "Dear Sir or Madam,", "Good morning {f},", "{f},"]
_CLOSINGS = ["Best regards,", "Kind regards,", "Thanks,", "Many thanks and best regards,", "Cheers,", "Regards,"]

# Legacy-charset languages: charsets they are sent in, names, subjects and sentences
# (written for this corpus; every string encodes in each of its charsets).
_LANGS: dict[str, dict] = {
    "de": {
        "charsets": ["iso-8859-1", "iso-8859-15", "windows-1252"],
        "names": ["Jürgen Weiß", "Bärbel Köhler", "Günter Müller", "Jörg Schäfer", "Anja Groß"],
        "subjects": ["Lieferung für Größe XL - Bestätigung", "Angebot Nr. {q} über Förderbänder", "Rückfrage zur Rechnung {q}",
                     "Terminverschiebung für die Wartung", "Änderung der Bestellmenge"],
        "sentences": ["Sehr geehrte Damen und Herren, vielen Dank für Ihre Anfrage.",
                      "Die Lieferung über {n} Paletten trifft voraussichtlich am Donnerstag ein.",
                      "Bitte bestätigen Sie die Übernahme; Rückfragen gern an unser Büro in München.",
                      "Der Preis erhöht sich ab nächstem Monat um {k} Prozent.",
                      "Anbei erhalten Sie die geänderte Auftragsbestätigung für Ihre Unterlagen.",
                      "Für Rückfragen stehe ich Ihnen gerne zur Verfügung.",
                      "Die Prüfung der beschädigten Ware ist leider noch nicht abgeschlossen."],
        "closings": ["Mit freundlichen Grüßen", "Viele Grüße", "Beste Grüße"],
    },
    "fr": {
        "charsets": ["iso-8859-1", "iso-8859-15", "windows-1252"],
        "names": ["Élodie Lefèvre", "François Dubois", "Hélène Mercier", "Jérôme Garçon"],
        "subjects": ["Réf. commande n° {q} - délai de livraison", "Devis pour l'entretien annuel", "Facture {q} à régler",
                     "Réunion de lancement prévue"],
        "sentences": ["Bonjour, pourriez-vous confirmer la date de livraison prévue ?",
                      "Le règlement sera effectué à réception de la facture.",
                      "Nous avons bien reçu les {n} cartons, mais deux étaient endommagés.",
                      "Merci de nous faire parvenir le bon de livraison signé.",
                      "Le technicien passera chez vous mardi matin à partir de 9 h.",
                      "Très cordialement, l'équipe achats."],
        "closings": ["Cordialement,", "Bien à vous,"],
    },
    "pl": {
        "charsets": ["iso-8859-2", "windows-1250"],
        "names": ["Łukasz Wójcik", "Małgorzata Żak", "Paweł Dąbrowski", "Agnieszka Kołodziej"],
        "subjects": ["Zamówienie nr {q} - potwierdzenie", "Opóźnienie dostawy", "Prośba o ofertę na części zamienne"],
        "sentences": ["Dzień dobry, dziękujemy za szybką odpowiedź.",
                      "Przesyłka z {n} paletami zostanie wysłana w przyszłym tygodniu.",
                      "Proszę o potwierdzenie terminu płatności faktury.",
                      "W załączniku przesyłam zaktualizowaną specyfikację.",
                      "Będę wdzięczny za informację o postępie zamówienia."],
        "closings": ["Z poważaniem,", "Pozdrawiam,"],
    },
    "cs": {
        "charsets": ["iso-8859-2", "windows-1250"],
        "names": ["Jiří Dvořák", "Věra Nováková", "Tomáš Říha"],
        "subjects": ["Objednávka č. {q}", "Žádost o cenovou nabídku", "Reklamace zboží"],
        "sentences": ["Dobrý den, děkujeme za Vaši objednávku.",
                      "Zboží bude expedováno během příštího týdne.",
                      "Prosím o zaslání faktury na správnou adresu.",
                      "Technik přijede ve čtvrtek ráno."],
        "closings": ["S pozdravem", "Děkuji a přeji hezký den"],
    },
    "ru": {
        "charsets": ["koi8-r", "windows-1251"],
        "names": ["Алексей Смирнов", "Ольга Иванова", "Дмитрий Кузнецов", "Наталья Попова"],
        "subjects": ["Счёт {q} на оплату", "Коммерческое предложение", "Задержка поставки по заказу {q}"],
        "sentences": ["Добрый день! Благодарим за ваш запрос.",
                      "Отгрузка {n} паллет запланирована на следующую неделю.",
                      "Просим подтвердить получение счёта и сроки оплаты.",
                      "Во вложении направляем обновлённую спецификацию.",
                      "Если возникнут вопросы, пожалуйста, свяжитесь со мной."],
        "closings": ["С уважением,", "Всего доброго,"],
    },
    "el": {
        "charsets": ["iso-8859-7", "windows-1253"],
        "names": ["Γιώργος Παπαδόπουλος", "Μαρία Νικολάου"],
        "subjects": ["Παραγγελία {q}", "Προσφορά για συντήρηση"],
        "sentences": ["Καλημέρα σας, ευχαριστούμε για την παραγγελία.",
                      "Η αποστολή θα γίνει την επόμενη εβδομάδα.",
                      "Παρακαλούμε επιβεβαιώστε την ημερομηνία παράδοσης."],
        "closings": ["Με εκτίμηση,"],
    },
    "tr": {
        "charsets": ["iso-8859-9", "windows-1254"],
        "names": ["Ayşe Yılmaz", "Mehmet Öztürk", "Çağla Şahin"],
        "subjects": ["Sipariş {q} hakkında", "Fiyat teklifi güncellemesi"],
        "sentences": ["Merhaba, siparişiniz için teşekkür ederiz.",
                      "Ürünler önümüzdeki hafta sevk edilecektir.",
                      "Lütfen fatura bilgilerinizi kontrol ediniz."],
        "closings": ["Saygılarımızla,", "İyi çalışmalar,"],
    },
    "ja": {
        "charsets": ["shift_jis", "iso-2022-jp"],
        "names": ["山田 太郎", "佐藤 花子", "鈴木 一郎", "高橋 美咲"],
        "subjects": ["お見積もりのご依頼", "注文番号{q}の納期について", "請求書送付のご案内"],
        "sentences": ["いつもお世話になっております。",
                      "添付の仕様にてお見積もりをお願いできますでしょうか。",
                      "納期は来月末を希望します。",
                      "ご確認のほど、よろしくお願いいたします。",
                      "先日の打ち合わせの議事録を送付いたします。"],
        "closings": ["よろしくお願いいたします。"],
    },
    "zh": {
        "charsets": ["gb2312"],
        "names": ["王伟", "李娜", "张强", "刘洋"],
        "subjects": ["关于订单{q}的发货时间", "报价单", "发票已寄出"],
        "sentences": ["您好，感谢您的询价。",
                      "货物将于下周发出，请注意查收。",
                      "附件是最新的产品规格和价格表。",
                      "如有任何问题，请随时与我联系。",
                      "我们希望下个月再订购一批零件。"],
        "closings": ["此致敬礼", "谢谢"],
    },
}
_LANG_WEIGHTS = {"de": 30, "fr": 14, "pl": 10, "cs": 6, "ru": 14, "el": 4, "tr": 5, "ja": 11, "zh": 6}

# --------------------------------------------------------------------------- MIME building


@dataclass
class _Part:
    """A MIME entity: ASCII header fields and an encoded body, or sub-parts."""

    headers: list[tuple[str, str]]
    body: bytes = b""
    parts: list[_Part] | None = None
    boundary: str = ""
    preamble: bytes = b""

    def serialize(self) -> bytes:
        out = [b"".join(f"{k}: {v}\r\n".encode("ascii") for k, v in self.headers), b"\r\n"]
        if self.parts is None:
            out.append(self.body)
        else:
            out.append(self.preamble)
            sep = b"--" + self.boundary.encode("ascii")
            for part in self.parts:
                out += [b"\r\n" if out[-1] and not out[-1].endswith(b"\r\n") else b"", sep, b"\r\n", part.serialize()]
            out += [b"\r\n" if not out[-1].endswith(b"\r\n") else b"", sep, b"--\r\n"]
        return b"".join(out)


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _b64(data: bytes) -> bytes:
    return _crlf(base64.encodebytes(data))


def _encode_body(text: str, charset: str, cte: str) -> bytes:
    data = text.replace("\r\n", "\n").encode(charset)
    if cte == "base64":
        return _b64(data.replace(b"\n", b"\r\n"))
    if cte == "quoted-printable":
        return _crlf(quopri.encodestring(data))
    return _crlf(data)


def _text_part(text: str, subtype: str, charset: str, cte: str, extra: list[tuple[str, str]] = ()) -> _Part:
    headers = [("Content-Type", f'text/{subtype}; charset="{charset}"'), ("Content-Transfer-Encoding", cte), *extra]
    body = _encode_body(text, charset, cte)
    return _Part(headers, body if body.endswith(b"\r\n") else body + b"\r\n")


def _multipart(subtype: str, parts: list[_Part], rng: random.Random, style: str, extra: list[tuple[str, str]] = ()) -> _Part:
    if style == "outlook":
        boundary = f"_{rng.randrange(10**3):03d}_{rng.getrandbits(64):016X}{rng.getrandbits(32):08X}_"
    elif style == "gmail":
        boundary = f"000000000000{rng.getrandbits(48):012x}"
    else:
        boundary = f"Apple-Mail={rng.getrandbits(64):016X}-{rng.getrandbits(16):04X}"
    params = ' type="text/html";' if subtype == "related" else ""
    headers = [("Content-Type", f'multipart/{subtype};{params}\r\n\tboundary="{boundary}"'), *extra]
    preamble = b"This is a multi-part message in MIME format.\r\n" if style == "outlook" and subtype == "mixed" else b""
    return _Part(headers, parts=parts, boundary=boundary, preamble=preamble)


def _attachment_part(data: bytes, ctype: str, filename: str, *, inline_cid: str | None = None) -> _Part:
    if inline_cid:
        headers = [("Content-Type", f'{ctype}; name="{filename}"'), ("Content-Description", filename),
                   ("Content-Disposition", f'inline; filename="{filename}"; size={len(data)}'),
                   ("Content-ID", f"<{inline_cid}>"), ("Content-Transfer-Encoding", "base64")]
    else:
        headers = [("Content-Type", f'{ctype}; name="{filename}"'), ("Content-Disposition", f'attachment;\r\n\tfilename="{filename}"'),
                   ("Content-Transfer-Encoding", "base64")]
    return _Part(headers, _b64(data))


def _q_word(data: bytes) -> str:
    safe = b"!*+-/"
    return "".join(chr(b) if (chr(b).isalnum() and b < 128) or b in safe else "_" if b == 32 else f"={b:02X}" for b in data)


def encoded_words(text: str, charset: str, enc: str = "B", limit: int = 45) -> str:
    """RFC 2047 encoded words for ``text`` in ``charset`` (whole characters per word), folded."""
    words: list[str] = []
    chunk = ""
    for ch in text:
        if chunk and len((chunk + ch).encode(charset)) > limit:
            words.append(chunk)
            chunk = ch
        else:
            chunk += ch
    if chunk:
        words.append(chunk)
    out = []
    for word in words:
        data = word.encode(charset)
        payload = base64.b64encode(data).decode() if enc == "B" else _q_word(data)
        out.append(f"=?{charset}?{enc}?{payload}?=")
    return "\r\n ".join(out)


def _header_text(text: str, charset: str, enc: str) -> str:
    """Plain ASCII as is, anything else as encoded words."""
    return text if text.isascii() else encoded_words(text, charset, enc)


def _address(name: str | None, addr: str, charset: str, enc: str) -> str:
    if not name:
        return addr
    if not name.isascii():
        return f"{encoded_words(name, charset, enc)} <{addr}>"
    if any(c in name for c in ',.;:()"'):
        return '"' + name.replace('"', "") + f'" <{addr}>'
    return f"{name} <{addr}>"


def _address_list(items: list[str]) -> str:
    return ",\r\n\t".join(items)


# --------------------------------------------------------------------------- content


@dataclass
class _Person:
    name: str | None
    addr: str


@dataclass
class _Voice:
    """Who writes, in which language and charset."""

    lang: str  # "en" or a key of _LANGS
    charset: str  # body charset
    header_charset: str
    enc: str  # encoded-word encoding, B or Q
    mailer: str  # outlook | gmail | apple | thunderbird


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        p=rng.choice(_PRODUCTS), q=rng.randint(10000, 99999), n=rng.randint(2, 400), d=rng.choice(_DAYS),
        c=f"{rng.randint(1, 14)}.{rng.randint(1, 9)}", k=rng.randint(2, 18), y=rng.randint(2024, 2027),
        f=rng.choice(_FIRST),
    )


def _sentence(rng: random.Random, voice: _Voice) -> str:
    if voice.lang == "en":
        return _fill(rng.choice(_SENTENCES), rng)
    return _fill(rng.choice(_LANGS[voice.lang]["sentences"]), rng)


def _paragraphs(rng: random.Random, voice: _Voice, chars: int) -> list[str]:
    """Paragraphs of 2-5 sentences, about ``chars`` characters in all."""
    out: list[str] = []
    total = 0
    while total < chars or not out:
        para = " ".join(_sentence(rng, voice) for _ in range(rng.randint(2, 5)))
        out.append(para)
        total += len(para) + 2
    return out


def _signature(rng: random.Random, person: _Person, company: str) -> str:
    title = rng.choice(["Sales Manager", "Key Account Manager", "Purchasing", "Head of Logistics", "Customer Service", "CFO"])
    lines = [person.name or person.addr.split("@")[0], title, company.replace("-", " ").title() + " GmbH",
             f"Phone: +49 {rng.randint(30, 899)} {rng.randint(100000, 9999999)}", person.addr]
    if rng.random() < 0.5:
        lines.append("This e-mail may contain confidential information. If you are not the intended recipient, please notify "
                     "the sender and delete it. Any unauthorised copying or distribution is prohibited.")
    return "\n".join(lines)


def _letter(rng: random.Random, voice: _Voice, sender: _Person, company: str, chars: int) -> str:
    if voice.lang == "en":
        greeting = _fill(rng.choice(_GREETINGS), rng)
        closing = rng.choice(_CLOSINGS)
    else:
        lang = _LANGS[voice.lang]
        greeting = ""
        closing = rng.choice(lang["closings"])
    body = "\n\n".join(_paragraphs(rng, voice, max(80, chars - 300)))
    sig = _signature(rng, sender, company) if voice.lang == "en" else (sender.name or sender.addr)
    return "\n\n".join(x for x in (greeting, body, closing + "\n" + sig) if x) + "\n"


# Outlook's Word HTML: the style block every message from it carries.
_MSO_STYLE = """<style><!--
/* Font Definitions */
@font-face
\t{font-family:"Cambria Math";
\tpanose-1:2 4 5 3 5 4 6 3 2 4;}
@font-face
\t{font-family:Calibri;
\tpanose-1:2 15 5 2 2 2 4 3 2 4;}
@font-face
\t{font-family:Aptos;}
/* Style Definitions */
p.MsoNormal, li.MsoNormal, div.MsoNormal
\t{margin:0cm;
\tfont-size:11.0pt;
\tfont-family:"Calibri",sans-serif;
\tmso-fareast-language:EN-US;}
a:link, span.MsoHyperlink
\t{mso-style-priority:99;
\tcolor:#0563C1;
\ttext-decoration:underline;}
span.E-MailFormatvorlage17
\t{mso-style-type:personal-compose;
\tfont-family:"Calibri",sans-serif;
\tcolor:windowtext;}
.MsoChpDefault
\t{mso-style-type:export-only;
\tfont-size:10.0pt;
\tmso-ligatures:none;}
@page WordSection1
\t{size:612.0pt 792.0pt;
\tmargin:70.85pt 70.85pt 2.0cm 70.85pt;}
div.WordSection1
\t{page:WordSection1;}
--></style><!--[if gte mso 9]><xml>
<o:shapedefaults v:ext="edit" spidmax="1026" />
</xml><![endif]--><!--[if gte mso 9]><xml>
<o:shapelayout v:ext="edit">
<o:idmap v:ext="edit" data="1" />
</o:shapelayout></xml><![endif]-->"""


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _outlook_html(text: str, charset: str, logo_cid: str | None = None) -> str:
    paras = []
    for line in text.split("\n"):
        if line.strip():
            paras.append(f'<p class="MsoNormal"><span lang="EN-US" style="mso-fareast-language:DE">{_esc(line)}'
                         '<o:p></o:p></span></p>')
        else:
            paras.append('<p class="MsoNormal"><span lang="EN-US"><o:p>&nbsp;</o:p></span></p>')
    if logo_cid:
        paras.append(f'<p class="MsoNormal"><span style="mso-fareast-language:DE"><img width="180" height="48" '
                     f'style="width:1.875in;height:.5in" id="Picture_x0020_1" src="cid:{logo_cid}" alt="Logo">'
                     '</span><o:p></o:p></p>')
    return (
        '<html xmlns:v="urn:schemas-microsoft-com:vml" xmlns:o="urn:schemas-microsoft-com:office:office" '
        'xmlns:w="urn:schemas-microsoft-com:office:word" xmlns:m="http://schemas.microsoft.com/office/2004/12/omml" '
        'xmlns="http://www.w3.org/TR/REC-html40">\n<head>\n'
        f'<meta http-equiv="Content-Type" content="text/html; charset={charset}">\n'
        '<meta name="Generator" content="Microsoft Word 15 (filtered medium)">\n'
        f"{_MSO_STYLE}\n</head>\n"
        '<body lang="DE" link="#0563C1" vlink="#954F72" style="word-wrap:break-word">\n<div class="WordSection1">\n'
        + "\n".join(paras)
        + "\n</div>\n</body>\n</html>\n"
    )


def _simple_html(text: str, mailer: str) -> str:
    paras = "".join(f"<div>{_esc(p)}</div><div><br></div>" for p in text.split("\n\n"))
    if mailer == "gmail":
        return f'<div dir="ltr">{paras}</div>\n'
    return f'<html><head><meta http-equiv="content-type" content="text/html; charset=UTF-8"></head><body>{paras}</body></html>\n'


def _css(rng: random.Random, chars: int) -> str:
    """Newsletter CSS: resets, utility classes, media queries (``chars`` long)."""
    props = ["margin:0", "padding:0", "border:0", "font-family:Helvetica,Arial,sans-serif", "font-size:16px",
             "line-height:24px", "color:#333333", "text-decoration:none", "display:block", "width:100%",
             "max-width:600px", "background-color:#f4f4f4", "mso-table-lspace:0pt", "mso-table-rspace:0pt",
             "-webkit-text-size-adjust:100%", "-ms-text-size-adjust:100%", "border-collapse:collapse", "text-align:left"]
    out = ["body,table,td,a{-webkit-text-size-adjust:100%;-ms-text-size-adjust:100%}",
           "img{border:0;height:auto;line-height:100%;outline:none;text-decoration:none}",
           "table{border-collapse:collapse!important}"]
    total = sum(map(len, out))
    i = 0
    while total < chars:
        sel = f".{rng.choice(['mcn', 'es', 'nl', 'em', 'col', 'blk'])}-{rng.choice(['text', 'img', 'btn', 'hdr', 'ftr', 'card'])}-{i}"
        rule = sel + "{" + ";".join(rng.sample(props, rng.randint(3, 8))) + "}"
        if i % 12 == 11:
            rule = f"@media only screen and (max-width:{rng.choice([480, 600, 640])}px){{{rule}}}"
        out.append(rule)
        total += len(rule) + 1
        i += 1
    return "\n".join(out)


def _newsletter_html(rng: random.Random, chars: int, charset: str) -> tuple[str, str]:
    """(HTML, its plain-text alternative) of a marketing newsletter about ``chars`` long."""
    css = _css(rng, int(chars * rng.uniform(0.25, 0.45)))
    brand = rng.choice(_COMPANIES).replace("-", " ").title()
    blocks, texts = [], []
    total = len(css) + 1500
    i = 0
    while total < chars:
        token = base64.urlsafe_b64encode(rng.randbytes(rng.randint(60, 120))).decode().rstrip("=")
        link = f"https://click.news.{rng.choice(_COMPANIES)}.example/ls/click?upn={token}"
        title = _fill(rng.choice(["New: {p} now in stock", "Save {k}% on {p}", "Webinar on {d}: {p} best practice",
                                  "Customer story: {n} sites switched to {p}"]), rng)
        para = " ".join(_fill(rng.choice(_SENTENCES), rng) for _ in range(rng.randint(2, 4)))
        block = (
            f'<tr><td class="mcn-card-{i}" style="padding:24px 32px 0 32px;background-color:#ffffff;'
            'font-family:Helvetica,Arial,sans-serif;font-size:16px;line-height:24px;color:#333333;">\n'
            f'<a href="{link}" target="_blank" style="text-decoration:none;"><img src="https://img.{brand.lower().replace(" ", "")}'
            f'.example/nl/{rng.getrandbits(48):012x}.jpg" width="536" alt="{_esc(title)}" style="display:block;width:100%;'
            'max-width:536px;height:auto;border:0;"></a>\n'
            f'<h2 style="margin:16px 0 8px 0;font-size:22px;line-height:28px;color:#111111;font-weight:bold;">{_esc(title)}</h2>\n'
            f'<p style="margin:0 0 16px 0;">{_esc(para)}</p>\n'
            f'<table role="presentation" cellspacing="0" cellpadding="0" border="0"><tr><td style="border-radius:4px;'
            f'background:#0066cc;"><a href="{link}&amp;cta=1" style="display:inline-block;padding:12px 24px;color:#ffffff;'
            'font-weight:bold;text-decoration:none;">Read more</a></td></tr></table>\n</td></tr>\n'
        )
        blocks.append(block)
        texts.append(f"{title}\n\n{para}\n\nRead more: {link}\n")
        total += len(block)
        i += 1
    unsubscribe = f"https://news.{rng.choice(_COMPANIES)}.example/unsubscribe?u={rng.getrandbits(64):x}"
    html = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        f'<html xmlns="http://www.w3.org/1999/xhtml"><head><meta http-equiv="Content-Type" content="text/html; charset={charset}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1.0">'
        f"<title>{_esc(brand)} News</title>\n<style type=\"text/css\">\n{css}\n</style>\n</head>\n"
        '<body style="margin:0;padding:0;background-color:#f4f4f4;">\n'
        '<div style="display:none;max-height:0;overflow:hidden;">This month: news, offers and events&#847;&zwnj;&nbsp;'
        + "&#847;&zwnj;&nbsp;" * 30 + "</div>\n"
        '<table role="presentation" width="100%" cellspacing="0" cellpadding="0" border="0" style="background-color:#f4f4f4;">'
        '<tr><td align="center">\n<table role="presentation" width="600" cellspacing="0" cellpadding="0" border="0" '
        'style="max-width:600px;">\n'
        + "".join(blocks)
        + f'<tr><td style="padding:32px;font-size:12px;line-height:18px;color:#888888;">You receive this e-mail because you '
        f'subscribed at {_esc(brand)}. <a href="{unsubscribe}" style="color:#888888;">Unsubscribe</a></td></tr>\n'
        "</table>\n</td></tr></table>\n</body></html>\n"
    )
    text = f"{brand} News\n\n" + "\n".join(texts) + f"\nUnsubscribe: {unsubscribe}\n"
    return html, text


# --------------------------------------------------------------------------- attachments


def _pdf(rng: random.Random, size: int) -> bytes:
    """A PDF: catalog, page, a compressed-looking content stream, xref and trailer."""
    head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    objs = [b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n",
            b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 1 >>\nendobj\n",
            b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>\nendobj\n"]
    stream = rng.randbytes(max(64, size - 420))
    objs.append(b"4 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream\nendobj\n")
    offsets, pos = [], len(head)
    for obj in objs:
        offsets.append(pos)
        pos += len(obj)
    xref = b"xref\n0 5\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    trailer = b"trailer\n<< /Size 5 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % pos
    return head + b"".join(objs) + xref + trailer


def _png(rng: random.Random, size: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", rng.randint(120, 1200), rng.randint(40, 900), 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rng.randbytes(max(16, size - 57))) + chunk(b"IEND", b"")


def _jpeg(rng: random.Random, size: int) -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x48\x00\x48\x00\x00"
    sof = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", rng.randint(480, 4000), rng.randint(480, 3000)) + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    body = rng.randbytes(max(16, size - 45)).replace(b"\xff", b"\xfe")
    return b"\xff\xd8" + app0 + sof + b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00" + body + b"\xff\xd9"


def _office(rng: random.Random, size: int, kind: str) -> bytes:
    """A DOCX or XLSX: a real ZIP with the parts Office expects (media stored, XML deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def put(name: str, data: bytes | str, method: int = zipfile.ZIP_DEFLATED) -> None:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            z.writestr(info, data)

        main = "word/document.xml" if kind == "docx" else "xl/workbook.xml"
        put("[Content_Types].xml", '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Types xmlns='
            '"http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType='
            '"application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
            f'<Override PartName="/{main}" ContentType="application/vnd.openxmlformats-officedocument.main+xml"/></Types>')
        put("_rels/.rels", '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Relationships xmlns='
            '"http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type='
            f'"http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="{main}"/></Relationships>')
        if kind == "docx":
            paras = "".join(f"<w:p><w:r><w:t>{_esc(_fill(rng.choice(_SENTENCES), rng))}</w:t></w:r></w:p>" for _ in range(40))
            put(main, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<w:document xmlns:w='
                f'"http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{paras}</w:body></w:document>')
        else:
            rows = "".join(f'<row r="{r}"><c r="A{r}"><v>{rng.randint(1, 99999)}</v></c><c r="B{r}"><v>{rng.random():.4f}</v></c></row>'
                           for r in range(1, 120))
            put(main, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<workbook xmlns='
                '"http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheets><sheet name="Sheet1" sheetId="1"/></sheets></workbook>')
            put("xl/worksheets/sheet1.xml", f'<?xml version="1.0" encoding="UTF-8"?>\n<worksheet><sheetData>{rows}</sheetData></worksheet>')
        used = buf.tell() + 200
        media = "word/media/image1.png" if kind == "docx" else "xl/media/image1.png"
        put(media, _png(rng, max(100, size - used)), zipfile.ZIP_STORED)
    return buf.getvalue()


_ATTACHMENTS = [
    # (weight, content type, extension, maker)
    (40, "application/pdf", "pdf", _pdf),
    (18, "image/jpeg", "jpg", _jpeg),
    (12, "image/png", "png", _png),
    (15, "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx",
     lambda rng, size: _office(rng, size, "docx")),
    (15, "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx",
     lambda rng, size: _office(rng, size, "xlsx")),
]
_ATTACHMENT_NAMES = ["Invoice_{q}", "Quote-{q}", "Delivery note {q}", "Scan_{q}", "IMG_{q}", "Specification v{k}",
                     "Price list {y}", "Contract draft {y}", "Report Q{k}", "Photo damaged goods {q}"]


def _attachment(rng: random.Random, raw_size: int) -> _Part:
    weights = [a[0] for a in _ATTACHMENTS]
    _, ctype, ext, make = rng.choices(_ATTACHMENTS, weights)[0]
    name = _fill(rng.choice(_ATTACHMENT_NAMES), rng)
    return _attachment_part(make(rng, raw_size), ctype, f"{name}.{ext}")


# --------------------------------------------------------------------------- people and headers


def _company_domain(rng: random.Random) -> str:
    return f"{rng.choice(_COMPANIES)}.{rng.choice(_TLDS)}"


def _person(rng: random.Random, domain: str, voice: _Voice | None = None) -> _Person:
    if voice is not None and voice.lang != "en" and rng.random() < 0.8:
        name = rng.choice(_LANGS[voice.lang]["names"])
        local = f"user{rng.randint(1, 999)}"
        return _Person(name, f"{local}@{domain}")
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    style = rng.random()
    addr = f"{first[0].lower()}.{last.lower()}@{domain}" if style < 0.5 else f"{first.lower()}.{last.lower()}@{domain}"
    if style < 0.15:
        return _Person(None, addr)
    if style < 0.35:
        return _Person(f"{last}, {first}", addr)  # Outlook's "Last, First" needs quoting
    return _Person(f"{first} {last}", addr)


# A mailbox hears from a bounded set of correspondents, some far more often than
# others: companies and their contacts are drawn from a per-seed directory with
# Zipf-like weights, so the same From/To values come back as in real mail.
DIRECTORY_COMPANIES = 60


@lru_cache(maxsize=8)
def _directory(seed: int) -> dict[str, list[tuple[str, list[_Person], list[float]]]]:
    """{language: [(domain, contacts, contact weights)]} of the seed's correspondents."""
    rng = random.Random(f"directory:{seed}")
    langs = ["en"] * 70 + [lang for lang, w in _LANG_WEIGHTS.items() for _ in range(max(2, w // 2))]
    out: dict[str, list[tuple[str, list[_Person], list[float]]]] = {}
    domains = set()
    for i in range(DIRECTORY_COMPANIES + len(_LANG_WEIGHTS)):
        # Every language gets companies of its own; the rest are mostly English-speaking.
        lang = list(_LANG_WEIGHTS)[i - DIRECTORY_COMPANIES] if i >= DIRECTORY_COMPANIES else rng.choice(langs)
        domain = _company_domain(rng)
        while domain in domains:
            domain = f"{rng.choice(_COMPANIES)}{rng.randint(2, 99)}.{rng.choice(_TLDS)}"
        domains.add(domain)
        voice = _Voice(lang, "utf-8", "utf-8", "Q", "outlook")
        contacts = [_person(rng, domain, voice) for _ in range(rng.randint(1, 9))]
        out.setdefault(lang, []).append((domain, contacts, [1 / (k + 1) for k in range(len(contacts))]))
    return out


def _company(rng: random.Random, seed: int, lang: str) -> tuple[str, list[_Person], list[float]]:
    companies = _directory(seed)[lang]
    return rng.choices(companies, [1 / (k + 1) ** 0.9 for k in range(len(companies))])[0]


def _contact(rng: random.Random, company: tuple[str, list[_Person], list[float]]) -> _Person:
    _, contacts, weights = company
    return rng.choices(contacts, weights)[0]


def _internal(rng: random.Random) -> _Person:
    local = rng.choice(_INTERNAL)
    name = None if "." not in local else f"{local[0].upper()}. {local.split('.')[1].title()}"
    return _Person(name, f"{local}@{OWN_DOMAIN}")


def message_id(rng: random.Random, mailer: str, domain: str) -> str:
    """A Message-ID in the style of ``mailer``."""
    if mailer == "outlook":
        host = f"{rng.choice(['AM', 'DB', 'VI', 'PA', 'FR'])}{rng.randint(0, 9)}PR{rng.randint(10, 99):02d}MB{rng.randint(1000, 9999)}"
        return f"<{host}{rng.getrandbits(40):010X}{rng.getrandbits(40):010X}@{host}.eurprd{rng.randint(1, 9):02d}.prod.outlook.com>"
    if mailer == "gmail":
        token = base64.b64encode(rng.randbytes(33)).decode().replace("/", "_").replace("+", "-")
        return f"<CA{token}@mail.gmail.com>"
    if mailer == "apple":
        return f"<{rng.getrandbits(32):08X}-{rng.getrandbits(16):04X}-{rng.getrandbits(16):04X}-{rng.getrandbits(64):016X}@{domain}>"
    return f"<{rng.getrandbits(64):x}.{rng.randint(1, 99999)}@{domain}>"


def _thread_ids(seed: int, thread: int, depth: int) -> list[str]:
    """The Message-IDs of a thread's earlier messages (the same for every reply in it)."""
    trng = random.Random(f"thread:{seed}:{thread}")
    domain = _company_domain(trng)
    return [message_id(trng, trng.choice(["outlook", "gmail", "apple", "thunderbird"]), domain) for _ in range(depth)]


def _when(rng: random.Random, n: int) -> datetime:
    tz = timezone(timedelta(hours=rng.choice([0, 1, 2, -5, -8, 9, 3, 5.5])))
    return (datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=3 * n + rng.randint(0, 2))).astimezone(tz)


def _trace(rng: random.Random, when: datetime, voice: _Voice, sender_domain: str) -> list[tuple[str, str]]:
    """Transport headers an MTA prepends: Received chain, ARC, DKIM, SPF (1-3 KB)."""
    headers = [("Return-Path", f"<bounces+{rng.getrandbits(32):x}@{sender_domain}>")]
    for hop in range(rng.randint(2, 5)):
        relay = rng.choice(_RELAYS + [f"mail-{rng.choice(['eur', 'am', 'db'])}{rng.randint(1, 9)}.outbound.protection.example"])
        stamp = format_datetime(when + timedelta(seconds=hop))
        headers.append(("Received", f"from {relay} ({relay} [192.0.2.{rng.randint(1, 254)}])\r\n\tby mx.{OWN_DOMAIN} "
                                    f"(Postfix) with ESMTPS id {rng.getrandbits(40):010X}\r\n\tfor <{OWN_ADDRESS}>; {stamp}"))
    if voice.mailer in ("outlook", "gmail") or rng.random() < 0.3:
        b = base64.b64encode(rng.randbytes(256)).decode()
        headers.append(("ARC-Seal", "i=1; a=rsa-sha256; s=arcselector10001; d=microsoft.example; cv=none;\r\n b="
                        + "\r\n\t".join(b[i:i + 76] for i in range(0, len(b), 76))))
        headers.append(("ARC-Authentication-Results", f"i=1; mx.microsoft.example 1; spf=pass smtp.mailfrom={sender_domain};"
                        f"\r\n dmarc=pass action=none header.from={sender_domain}; dkim=pass header.d={sender_domain}; arc=none"))
    sig = base64.b64encode(rng.randbytes(rng.choice([128, 256]))).decode()
    headers.append(("DKIM-Signature", f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={sender_domain}; s=selector1;\r\n\t"
                    "h=From:Date:Subject:Message-ID:Content-Type:MIME-Version:X-MS-Exchange-SenderADCheck;\r\n\t"
                    f"bh={base64.b64encode(rng.randbytes(32)).decode()};\r\n\tb="
                    + "\r\n\t".join(sig[i:i + 76] for i in range(0, len(sig), 76))))
    headers.append(("Authentication-Results", f"mx.{OWN_DOMAIN}; dkim=pass header.d={sender_domain}; spf=pass; dmarc=pass"))
    return headers


def _mailer_headers(rng: random.Random, voice: _Voice, has_attach: bool, topic: str) -> list[tuple[str, str]]:
    if voice.mailer == "outlook":
        index = base64.b64encode(rng.randbytes(22 + 5 * rng.randint(0, 6))).decode()
        return [("Thread-Topic", topic if topic.isascii() else encoded_words(topic, "utf-8")),
                ("Thread-Index", index), ("X-MS-Has-Attach", "yes" if has_attach else ""),
                ("X-MS-TNEF-Correlator", ""), ("Content-Language", rng.choice(["de-DE", "en-US", "en-GB", "fr-FR"])),
                ("X-MS-Exchange-Organization-SCL", str(rng.randint(-1, 1))),
                ("X-Mailer", "Microsoft Outlook 16.0")]
    if voice.mailer == "apple":
        return [("X-Mailer", "Apple Mail (2.3774.600.62)")]
    if voice.mailer == "thunderbird":
        return [("User-Agent", "Mozilla Thunderbird")]
    return []


# --------------------------------------------------------------------------- the business corpus: messages


@dataclass(frozen=True)
class Sample:
    """One generated message and what the generator meant it to be."""

    raw: bytes
    kind: str
    charset: str  # charset of the body text ("us-ascii", "utf-8" or a legacy one)
    target: int  # the size it was drawn to have (bytes)


def _target(rng: random.Random) -> tuple[int, bool]:
    if rng.random() < HEAVY_SHARE:
        lo, hi = HEAVY_RANGE
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi)))), True
    size = int(rng.lognormvariate(math.log(BODY_MEDIAN), BODY_SIGMA))
    return max(BODY_RANGE[0], min(BODY_RANGE[1], size)), False


def _kind(rng: random.Random, target: int, heavy: bool) -> str:
    if heavy:
        table = _HEAVY_KINDS
    else:
        table = {k: w for k, (w, least) in _KINDS.items() if least <= target}
    return rng.choices(list(table), list(table.values()))[0]


def _voice(rng: random.Random, kind: str) -> _Voice:
    mailer = rng.choices(["outlook", "gmail", "apple", "thunderbird"], [50, 25, 15, 10])[0]
    if kind.startswith("newsletter"):
        return _Voice("en", "utf-8", "utf-8", "Q", "newsletter")
    roll = rng.random()
    if roll < LEGACY_SHARE:
        lang = rng.choices(list(_LANG_WEIGHTS), list(_LANG_WEIGHTS.values()))[0]
        charset = rng.choice(_LANGS[lang]["charsets"])
        # Japanese mailers send ISO-2022-JP headers; the others use the body's charset.
        return _Voice(lang, charset, charset, "B" if lang in ("ja", "zh", "ru", "el") else rng.choice("BQ"), mailer)
    if roll < LEGACY_SHARE + UTF8_FOREIGN_SHARE:
        lang = rng.choices(list(_LANG_WEIGHTS), list(_LANG_WEIGHTS.values()))[0]
        return _Voice(lang, "utf-8", "utf-8", rng.choice("BQ"), mailer)
    return _Voice("en", "us-ascii" if mailer == "thunderbird" and rng.random() < 0.5 else "utf-8", "utf-8", "Q", mailer)


def _body_cte(rng: random.Random, voice: _Voice, html: bool = False) -> str:
    if voice.charset == "iso-2022-jp":
        return "7bit"
    if voice.charset == "us-ascii":
        return "7bit"
    if voice.mailer == "outlook":
        return "quoted-printable" if voice.lang in ("en", "de", "fr", "pl", "cs", "tr") or html else "base64"
    if voice.mailer == "gmail":
        return "quoted-printable" if voice.lang == "en" or rng.random() < 0.5 else "base64"
    return rng.choice(["quoted-printable", "8bit", "base64"]) if voice.lang != "en" else rng.choice(["7bit", "quoted-printable"])


def _subject(rng: random.Random, voice: _Voice) -> str:
    if voice.mailer == "newsletter":
        return _fill(rng.choice(_NEWS_SUBJECTS), rng)
    if voice.lang == "en":
        return _fill(rng.choice(_SUBJECTS), rng)
    return _fill(rng.choice(_LANGS[voice.lang]["subjects"]), rng)


def _quoted_thread(rng: random.Random, voice: _Voice, people: list[_Person], subject: str, when: datetime,
                   chars: int) -> str:
    """The earlier messages of a thread, quoted as the mailer does, about ``chars`` long."""
    parts: list[str] = []
    total = 0
    depth = 0
    t = when
    while total < chars or not parts:
        depth += 1
        t -= timedelta(hours=rng.randint(1, 50))
        who = rng.choice(people)
        text = "\n\n".join(_paragraphs(rng, voice, rng.randint(150, 700)))
        if voice.mailer == "outlook":
            block = (f"________________________________\nFrom: {who.name or who.addr} <{who.addr}>\n"
                     f"Sent: {t.strftime('%A, %B %d, %Y %H:%M')}\nTo: {people[0].addr}\nSubject: RE: {subject}\n\n{text}\n")
        else:
            quote = ">" * depth + " "
            lead = ">" * (depth - 1) + (" " if depth > 1 else "")
            block = (f"{lead}On {t.strftime('%a, %d %b %Y at %H:%M')}, {who.name or ''} <{who.addr}> wrote:\n"
                     + "\n".join(quote + line if line else quote.rstrip() for line in text.split("\n")) + "\n")
        parts.append(block)
        total += len(block)
    return "\n".join(parts)


class _Builder:
    """Builds one business message from its rng, kind and size budget."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.rng = random.Random(f"business:{seed}:{n}")

    def sample(self) -> Sample:
        rng = self.rng
        target, heavy = _target(rng)
        kind = _kind(rng, target, heavy)
        voice = _voice(rng, kind)
        when = _when(rng, self.n)
        firm = _company(rng, self.seed, voice.lang)
        customer_domain = firm[0]
        company = customer_domain.split(".")[0]
        customer = _contact(rng, firm)
        inbound = kind.startswith("newsletter") or rng.random() < 0.7
        if kind.startswith("newsletter"):
            brand = rng.choice(_COMPANIES)
            sender = _Person(brand.replace("-", " ").title() + " News", f"news@mail.{brand}.example")
        else:
            sender = customer if inbound else _internal(rng)
        to = [_Person("Sales", OWN_ADDRESS) if rng.random() < 0.5 else _Person(None, OWN_ADDRESS)] if inbound else [customer]
        to += [_contact(rng, firm) for _ in range(rng.choices([0, 1, 2, 3], [60, 25, 10, 5])[0])]
        to = list({p.addr: p for p in to}.values())
        cc = []
        if not kind.startswith("newsletter") and rng.random() < 0.4:
            cc = [_internal(rng) if rng.random() < 0.5 else _contact(rng, firm) for _ in range(rng.randint(1, 5))]
            cc = list({p.addr: p for p in cc}.values())
        subject = _subject(rng, voice)
        reply = kind == "reply_thread" or (kind in ("plain", "alternative", "attachment", "related") and rng.random() < 0.35)
        thread = rng.randrange(max(1, self.n // 4 + 1))
        refs = _thread_ids(self.seed, thread, rng.randint(1, 12)) if reply else []
        if reply:
            subject = rng.choice({"de": ["AW: ", "WG: "], "fr": ["RE: ", "TR: "]}.get(voice.lang, ["RE: ", "Re: ", "Re: "])) + subject

        head: list[tuple[str, str]] = []
        hch, enc = voice.header_charset, voice.enc
        head.append(("From", _address(sender.name, sender.addr, hch, enc)))
        head.append(("To", _address_list([_address(p.name, p.addr, hch, enc) for p in to])))
        if cc:
            head.append(("CC" if voice.mailer == "outlook" else "Cc", _address_list([_address(p.name, p.addr, hch, enc) for p in cc])))
        head.append(("Subject", _header_text(subject, hch, enc)))
        head.append(("Date", format_datetime(when)))
        head.append(("Message-ID", message_id(rng, voice.mailer, sender.addr.split("@")[1])))
        if refs:
            head.append(("In-Reply-To", refs[-1]))
            head.append(("References", "\r\n ".join(refs)))
        if kind.startswith("newsletter"):
            lid = sender.addr.split("@")[1]
            head += [("List-Id", f"<newsletter.{lid}>"),
                     ("List-Unsubscribe", f"<mailto:unsubscribe-{rng.getrandbits(40):x}@{lid}>,\r\n <https://{lid}/u/{rng.getrandbits(64):x}>"),
                     ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"), ("Precedence", "bulk"),
                     ("X-Campaign-ID", f"{rng.getrandbits(48):x}")]
        head += _mailer_headers(rng, voice, kind in ("attachment", "attachment_large", "related", "forward"), subject)
        head.append(("MIME-Version", "1.0"))
        trace = _trace(rng, when, voice, sender.addr.split("@")[1])

        fixed = sum(len(k) + len(v) + 4 for k, v in trace + head) + 200
        budget = max(300, target - fixed)
        body = self._body(kind, voice, budget, sender, company, [sender, customer, *to, *cc], subject, when)
        top = _Part(trace + head + body.headers, body.body, body.parts, body.boundary, body.preamble)
        charset = "utf-8" if kind.startswith("newsletter") else voice.charset
        return Sample(top.serialize(), kind, charset, target)

    # Bytes per character of an encoded body (base64 adds a third, QP a little).
    @staticmethod
    def _growth(cte: str, voice: _Voice) -> float:
        if cte == "base64":
            return 1.37 * (2.0 if voice.lang in ("ja", "zh", "ru", "el") and voice.charset == "utf-8" else 1.0)
        if cte == "quoted-printable":
            return {"en": 1.02, "ja": 4.5, "zh": 4.5, "ru": 5.5, "el": 5.5}.get(voice.lang, 1.12)
        return 1.0

    def _text_and_html(self, voice: _Voice, text: str, logo: str | None = None) -> tuple[_Part, _Part]:
        rng = self.rng
        cte_t = _body_cte(rng, voice)
        cte_h = _body_cte(rng, voice, html=True)
        plain = _text_part(text, "plain", voice.charset, cte_t)
        html = _outlook_html(text, voice.charset, logo) if voice.mailer == "outlook" else _simple_html(text, voice.mailer)
        return plain, _text_part(html, "html", voice.charset, cte_h)

    def _body(self, kind: str, voice: _Voice, budget: int, sender: _Person, company: str, people: list[_Person],
              subject: str, when: datetime) -> _Part:
        rng = self.rng
        grow = self._growth(_body_cte(random.Random(0), voice), voice)
        if kind == "plain":
            text = _letter(rng, voice, sender, company, int(budget / grow))
            return _text_part(text, "plain", voice.charset, _body_cte(rng, voice))
        if kind == "alternative":
            # Outlook's HTML: ~2.2 KB of style plus ~90 bytes of markup per line.
            html_overhead = 2600 if voice.mailer == "outlook" else 200
            text = _letter(rng, voice, sender, company, int((budget - html_overhead) / (grow * 2.6)))
            return _multipart("alternative", list(self._text_and_html(voice, text)), rng, voice.mailer)
        if kind == "reply_thread":
            alt = voice.mailer in ("outlook", "gmail") and budget > 5000
            room = budget / grow / (2.4 if alt else 1.0)
            top = _letter(rng, voice, sender, company, rng.randint(120, 500))
            text = top + "\n" + _quoted_thread(rng, voice, people, subject, when, int(room - len(top)))
            if not alt:
                return _text_part(text, "plain", voice.charset, _body_cte(rng, voice))
            return _multipart("alternative", list(self._text_and_html(voice, text)), rng, voice.mailer)
        if kind in ("newsletter_html", "newsletter_alt"):
            alt = kind == "newsletter_alt"
            html, text = _newsletter_html(rng, int(budget / (1.28 if alt else 1.12)), "utf-8")
            html_part = _text_part(html, "html", "utf-8", "quoted-printable" if rng.random() < 0.8 else "base64")
            if not alt:
                return html_part
            return _multipart("alternative", [_text_part(text, "plain", "utf-8", "quoted-printable"), html_part], rng, "gmail")
        if kind in ("attachment", "attachment_large"):
            text = _letter(rng, voice, sender, company, rng.randint(200, 900))
            first: _Part
            if voice.mailer == "outlook" and rng.random() < 0.7:
                first = _multipart("alternative", list(self._text_and_html(voice, text)), rng, voice.mailer)
            else:
                first = _text_part(text, "plain", voice.charset, _body_cte(rng, voice))
            used = len(first.serialize()) + 300
            count = rng.choices([1, 2, 3], [75, 18, 7])[0]
            room = max(400, budget - used)
            sizes = [room / count] * count
            files = [_attachment(rng, max(300, int(s / 1.37) - 200)) for s in sizes]
            return _multipart("mixed", [first, *files], rng, voice.mailer)
        if kind == "related":
            logo_cid = f"image001.png@01DA{rng.getrandbits(32):08X}.{rng.getrandbits(32):08X}"
            text = _letter(rng, voice, sender, company, rng.randint(300, 1200))
            plain, html = self._text_and_html(voice, text, logo_cid)
            used = len(plain.serialize()) + len(html.serialize()) + 600
            logo = _attachment_part(_png(rng, max(600, int((budget - used) / 1.37))), "image/png", "image001.png",
                                    inline_cid=logo_cid)
            related = _multipart("related", [html, logo], rng, "outlook")
            return _multipart("alternative", [plain, related], rng, "outlook")
        if kind == "forward":
            return self._forward(voice, budget, sender, company)
        raise ValueError(kind)

    def _forward(self, voice: _Voice, budget: int, sender: _Person, company: str) -> _Part:
        rng = self.rng
        note = _letter(rng, voice, sender, company, rng.randint(100, 400))
        lead = _text_part("FYI, see below.\n\n" + note, "plain", voice.charset, _body_cte(rng, voice))
        inner_rng = random.Random(f"forwarded:{self.seed}:{self.n}")
        inner_domain = _company_domain(inner_rng)
        inner_sender = _person(inner_rng, inner_domain)
        inner_voice = _Voice("en", "utf-8", "utf-8", "Q", inner_rng.choice(["outlook", "gmail"]))
        when = _when(inner_rng, max(0, self.n - 500))
        inner_head = [("From", _address(inner_sender.name, inner_sender.addr, "utf-8", "Q")), ("To", f"<{OWN_ADDRESS}>"),
                      ("Subject", _subject(inner_rng, inner_voice)), ("Date", format_datetime(when)),
                      ("Message-ID", message_id(inner_rng, inner_voice.mailer, inner_domain)), ("MIME-Version", "1.0")]
        room = max(600, budget - len(lead.serialize()) - 800)
        text = _letter(inner_rng, inner_voice, inner_sender, inner_domain.split(".")[0], min(room, rng.randint(600, 3000)))
        inner_body: _Part = _text_part(text, "plain", "utf-8", "quoted-printable")
        left = room - len(text)
        if left > 1500:
            # The forwarded message brought its own attachment.
            inner_body = _multipart("mixed", [inner_body, _attachment(inner_rng, int(left / 1.37))], inner_rng, "gmail")
        inner = _Part(inner_head + inner_body.headers, inner_body.body, inner_body.parts, inner_body.boundary, inner_body.preamble)
        attached = _Part([("Content-Type", "message/rfc822"), ("Content-Disposition", 'attachment; filename="forwarded.eml"')],
                         inner.serialize())
        return _multipart("mixed", [lead, attached], rng, voice.mailer)


def business_sample(n: int, seed: int = 0) -> Sample:
    """Message ``n`` of the business corpus, with its kind and charset; deterministic for (n, seed)."""
    return _Builder(n, seed).sample()


def business_message(n: int, seed: int = 0) -> bytes:
    """Message ``n`` of the business corpus (wire format, CRLF line endings)."""
    return business_sample(n, seed).raw


CORPORA = {"small": typical_message, "business": business_message}
CORPUS_DESCRIPTIONS = {
    "small": "small: the original corpus, ~4 KiB, 30% HTML alternative, 10% small attachment",
    "business": f"business: log-normal around {BODY_MEDIAN / 1000:.1f} KB plus {HEAVY_SHARE:.1%} of "
                f"{HEAVY_RANGE[0] // 1000}-{HEAVY_RANGE[1] // 1000} KB (attachments mostly), newsletters with big CSS, "
                f"attachments, forwards, long quoted threads, {LEGACY_SHARE:.0%} legacy charsets",
}
