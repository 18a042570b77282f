"""The base install carries no GPL code: checked on the installed packages' metadata."""

import importlib.metadata
import re

from packaging.requirements import Requirement

# GPL or AGPL, not the LGPL (which a Python import does not propagate)
GPL = re.compile(r"(?<!L)GPL|(?<!Lesser )General Public License")


def _base_install(name, seen):
    """Distribution name -> licence text, for ``name`` and what it requires (no extras)."""
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:  # a requirement for another platform
        return seen
    meta = dist.metadata
    # The licence expression and classifiers; the License field only when it is a name, not a
    # whole licence text that may mention other licences.
    fields = [meta.get("License-Expression") or ""]
    fields += [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if len(meta.get("License") or "") < 80:
        fields.append(meta.get("License") or "")
    seen[key] = " | ".join(field for field in fields if field)
    for requirement in dist.requires or []:
        requirement = Requirement(requirement)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            _base_install(requirement.name, seen)
    return seen


def test_no_gpl_package_in_the_base_install():
    licences = _base_install("sb-crossmodal-kd", {})
    assert "torch" in licences and "speechbrain" in licences  # the walk reached the stack
    gpl = {name: text for name, text in licences.items() if GPL.search(text)}
    assert not gpl, f"GPL-licensed packages in the base install (move them to an extra): {gpl}"


def test_the_check_sees_gpl_and_lgpl_apart():
    assert GPL.search("License :: OSI Approved :: GNU General Public License v3 (GPLv3)")
    assert GPL.search("GPL-3.0-or-later") and GPL.search("AGPL-3.0")
    assert not GPL.search("LGPL-2.1-or-later")
    assert not GPL.search("License :: OSI Approved :: GNU Lesser General Public License v3")
