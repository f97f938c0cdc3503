"""The licence a build's Hub card declares: its base model's.

A quantized build is under its base model's licence. qoqopt knows QoQ-Med's (MIT); for any other
base the user names it, as one of the Hub's licence ids (the Hub checks the card's `license` on
push, after the large files went up), or as `other` with its name and link (Qwen2.5-VL-3B's
qwen-research licence is one such).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import QoqoptError

QOQ_MED_LICENSE = "mit"  # QoQ-Med's release
QOQ_MED_REPO = re.compile(r"^ddvd233/QoQ-Med", re.IGNORECASE)
# The Hub's licence ids: huggingface/hub-docs, docs/hub/repositories-licenses.md (83 ids, 2026-08)
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0
lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openmdw-1.0 openmdw-1.1 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 grok2-community
gemma unknown other
""".split())
# The licence text a checkpoint ships beside its weights. Apache-2.0 (section 4a) and MIT both ask that
# it go with every copy, a quantized build included; the Hub's `license: other` points to it.
LICENSE_TEXTS = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md")
LICENSE_FILES = (*LICENSE_TEXTS, "NOTICE", "NOTICE.txt", "NOTICE.md")  # with the notices Apache-2.0 asks for


def license_files(folder: Path) -> list[Path]:
    """The checkpoint folder's licence and notice files, as named in LICENSE_FILES."""
    return [Path(folder) / name for name in LICENSE_FILES if (Path(folder) / name).is_file()]


def copy_license_files(src: Path, dst: Path) -> list[Path]:
    """The source's licence and notice files copied into a build (Apache-2.0 4a, MIT ask for them)."""
    return [Path(shutil.copyfile(path, Path(dst) / path.name)) for path in license_files(src)]


class NoLicense(QoqoptError):
    """The base is not QoQ-Med and no --license was given."""


@dataclass(frozen=True)
class CardLicense:
    id: str
    name: str | None = None  # `other` only: the licence's own short name (license_name)
    link: str | None = None  # ... and where its text is (license_link)

    def metadata(self) -> dict:
        extra = {"license_name": self.name, "license_link": self.link} if self.id == "other" else {}
        return {"license": self.id, **{k: v for k, v in extra.items() if v}}


UNNAMED = CardLicense("other")  # what a dry run's card shows for a licence it was not told


def checked_license(license_id: str | None, name: str | None = None, link: str | None = None) -> CardLicense | None:
    """--license (with --license-name/--license-link for `other`), refused in one line when the Hub
    would refuse the card; None when none was given."""
    if license_id is None:
        if name or link:
            raise QoqoptError("--license-name and --license-link go with --license other")
        return None
    if license_id not in HUB_LICENSES:
        raise QoqoptError(f"--license {license_id!r} is not one of the Hub's licence ids (such as mit, apache-2.0, "
                          "llama3.1); for any other, --license other --license-name NAME --license-link URL")  # fmt: skip
    if (name or link) and license_id != "other":
        raise QoqoptError(f"--license-name and --license-link go with --license other, not {license_id}")
    if license_id == "other" and not name:
        raise QoqoptError("--license other needs --license-name (the licence's short name, such as qwen-research)")
    if name and not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
        raise QoqoptError(f"--license-name {name!r}: lower-case letters, digits, '.' and '-' (such as qwen-research)")
    return CardLicense(license_id, name, link)


def card_license(base: str, given: CardLicense | None, files: list[str] = ()) -> CardLicense:
    """The card's licence: the one given, else QoQ-Med's own for a QoQ-Med base. ``other`` links
    to its text: --license-link, else the licence file among the build's ``files`` (the Hub reads
    `license_link: LICENSE` as the repo's own file); with neither, the card would point nowhere."""
    shipped = [f for f in files if f in LICENSE_TEXTS]
    if given is not None and given.id == "other" and not given.link:
        if not shipped:
            raise NoLicense("--license other needs --license-link (the URL of its text) when the build ships no "
                            "LICENSE file from its source")  # fmt: skip
        return CardLicense("other", given.name, shipped[0])
    if given is not None:
        return given
    if QOQ_MED_REPO.match(base):
        return CardLicense(QOQ_MED_LICENSE)
    raise NoLicense(f"the card needs {base}'s licence, which qoqopt knows only for QoQ-Med: pass --license "
                    "with the licence id on its Hub page (such as apache-2.0)")  # fmt: skip
