"""Stand-in of modules/ui_extra_networks.py (A1111 v1.10 / Forge): ``register_page``,
``quote_js`` and the ``ExtraNetworksPage`` helpers a page subclass calls.

``ExtraNetworksPage(title)``: ``name = title.lower()``, ``extra_networks_tabname`` (spaces →
``_``), ``items``/``metadata`` dicts; ``read_user_metadata(item)`` merges ``<file>.json``
(``extra_networks.get_user_metadata``) into ``item["user_metadata"]`` and takes its
``description``; ``find_preview(path)`` looks for ``path.{png,jpg,jpeg,webp,gif}`` and
``path.preview.*``; ``find_description`` reads ``path.txt`` / ``path.description.txt``;
``search_terms_from_path`` is the path relative to a preview directory's parent.
"""

import json
import os

extra_pages = []
allowed_dirs = set()


# A1111 v1.10 / Forge modules/ui_extra_networks.py: register_page


def register_page(page):
    extra_pages.append(page)
    allowed_dirs.clear()
    allowed_dirs.update(set(sum([x.allowed_directories_for_previews() for x in extra_pages], [])))


# A1111 v1.10 / Forge modules/ui_extra_networks.py: quote_js


def quote_js(s):
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def _user_metadata(filename):
    path = os.path.splitext(filename)[0] + ".json"
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf8") as f:
        return json.load(f)


# A1111 v1.10 / Forge modules/ui_extra_networks.py: ExtraNetworksPage


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata = {}
        self.items = {}

    def refresh(self):
        pass

    # A1111 v1.10 / Forge modules/ui_extra_networks.py: read_user_metadata

    def read_user_metadata(self, item, use_cache=True):
        metadata = _user_metadata(item.get("filename"))
        if metadata.get("description") is not None:
            item["description"] = metadata["description"]
        item["user_metadata"] = metadata

    def link_preview(self, filename):
        return "./sd_extra_networks/thumb?filename=" + filename.replace("\\", "/")

    # A1111 v1.10 / Forge modules/ui_extra_networks.py: search_terms_from_path

    def search_terms_from_path(self, filename, possible_directories=None):
        abspath = os.path.abspath(filename)
        for parentdir in (possible_directories if possible_directories is not None else self.allowed_directories_for_previews()):
            parentdir = os.path.dirname(os.path.abspath(parentdir))
            if abspath.startswith(parentdir):
                return os.path.relpath(abspath, parentdir)
        return ""

    def create_item(self, name, index=None):
        raise NotImplementedError

    def list_items(self):
        raise NotImplementedError

    def allowed_directories_for_previews(self):
        return []

    # A1111 v1.10 / Forge modules/ui_extra_networks.py: get_sort_keys

    def get_sort_keys(self, path):
        st = os.stat(path)
        return {"date_created": int(st.st_mtime), "date_modified": int(st.st_ctime),
                "name": os.path.basename(path).lower(), "path": str(path).lower()}

    # A1111 v1.10 / Forge modules/ui_extra_networks.py: find_preview

    def find_preview(self, path):
        for ext in ("png", "jpg", "jpeg", "webp", "gif"):
            for file in (f"{path}.{ext}", f"{path}.preview.{ext}"):
                if os.path.exists(file):
                    return self.link_preview(file)
        return None

    # A1111 v1.10 / Forge modules/ui_extra_networks.py: find_embedded_preview

    def find_embedded_preview(self, path, name, metadata):
        if "ssmd_cover_images" in metadata and any(json.loads(metadata["ssmd_cover_images"])):
            return f"./sd_extra_networks/cover-images?page={self.extra_networks_tabname}&item={name}"
        return None

    # A1111 v1.10 / Forge modules/ui_extra_networks.py: find_description

    def find_description(self, path):
        for file in (f"{path}.txt", f"{path}.description.txt"):
            if os.path.exists(file):
                with open(file, encoding="utf-8", errors="replace") as f:
                    return f.read()
        return None

    def create_html_items(self):
        """What the host does with ``list_items`` when it renders the page (metadata viewer data)."""
        self.items = {}
        for item in self.list_items():
            self.items[item["name"]] = item
            self.metadata[item["name"]] = item.get("metadata")
        return self.items
