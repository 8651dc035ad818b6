"""The "QR-LoRA" page of the Extra Networks tab (host-only: built on the host's classes).

Modelled on the interface of ``modules/ui_extra_networks.py`` ``ExtraNetworksPage`` (A1111
v1.10 and Forge): ``refresh``, ``list_items``, ``create_item(name, index=None,
enable_filter=True)`` (``get_single_card`` passes ``enable_filter``), ``allowed_directories_for_previews``,
``create_user_metadata_editor``; item keys ``name``, ``filename``, ``preview``,
``description``, ``search_terms``, ``local_preview``, ``metadata`` (the metadata viewer),
``sort_keys``, and ``prompt`` as a JavaScript expression, like the built-in Lora page.
The per-card default λ is the user metadata's ``preferred weight`` (edited in the card's
user-metadata editor, saved beside the file as ``<name>.json`` by the host).
"""

from __future__ import annotations

import os

from .library import shown_metadata, trigger_words


def make_page(ui_extra_networks, engine, shared):
    quote_js = ui_extra_networks.quote_js
    library = engine.library

    class ExtraNetworksPageQRLora(ui_extra_networks.ExtraNetworksPage):
        def __init__(self):
            super().__init__("QR-LoRA")
            self.allow_negative_prompt = False

        def refresh(self):
            library.refresh()

        def create_item(self, name, index=None, enable_filter=True):
            entry = next((e for e in library.entries() if e.name == name), None)
            if entry is None:
                return None
            path = os.path.splitext(entry.path)[0]
            phrase, tags = trigger_words(entry.metadata)
            search = [self.search_terms_from_path(entry.path)] + [t for t, _ in tags[:10]]
            if phrase:
                search.append(phrase)
            short = library.shorthash(entry)  # shown on the card's edit view from the first listing
            if short:
                search.append(short)
            description = self.find_description(path) or entry.metadata.get("modelspec.description") or entry.error or None
            item = {
                "name": entry.name,
                "filename": entry.path,
                "shorthash": short,
                "preview": self.find_preview(path) or self.find_embedded_preview(path, entry.name, entry.metadata),
                "description": description,
                "search_terms": search,
                "local_preview": f"{path}.{getattr(shared.opts, 'samples_format', 'png')}",
                "metadata": shown_metadata(entry.metadata),
                "sort_keys": {"default": index, **self.get_sort_keys(entry.path)},
            }
            self.read_user_metadata(item)
            user = item.get("user_metadata") or {}
            activation = user.get("activation text") or phrase
            weight = user.get("preferred weight")
            weight_js = repr(float(weight)) if weight not in (None, "", 0, 0.0) else "opts.qrlora_default_multiplier"
            item["prompt"] = quote_js(f"<qrlora:{entry.name}:") + " + " + weight_js + " + " + quote_js(">")
            if activation:
                item["prompt"] += " + " + quote_js(" " + activation)
            return item

        def list_items(self):
            for index, entry in enumerate(library.entries()):
                item = self.create_item(entry.name, index)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return library.folders()

        def create_user_metadata_editor(self, ui, tabname):
            return make_editor()(ui, tabname, self)

    return ExtraNetworksPageQRLora()


def make_editor():
    """The card editor: the host's default one plus activation text and the per-card λ.
    Gradio is only imported here, when the UI is built."""
    import gradio as gr
    from modules import ui_extra_networks_user_metadata

    class QRLoraUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
        def create_editor(self):
            self.create_default_editor_elems()
            self.edit_activation_text = gr.Text(label="Activation text", info="added to the prompt with the tag")
            self.slider_preferred_weight = gr.Slider(label="Default λ for this card", info="0: the QR-LoRA setting",
                                                     minimum=-2.0, maximum=2.0, step=0.05)
            self.edit_notes = gr.TextArea(label="Notes", lines=4)
            self.create_default_buttons()
            shown = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                     self.edit_activation_text, self.slider_preferred_weight]
            self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=shown)\
                .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
            self.setup_save_handler(self.button_save, self.save_qrlora_user_metadata,
                                    [self.edit_description, self.edit_notes, self.edit_activation_text,
                                     self.slider_preferred_weight])

        def put_values_into_components(self, name):
            user = self.get_user_metadata(name)
            values = super().put_values_into_components(name)
            return [*values[:5], user.get("activation text", ""), float(user.get("preferred weight", 0.0) or 0.0)]

        def save_qrlora_user_metadata(self, name, desc, notes, activation_text, preferred_weight):
            user = self.get_user_metadata(name)
            user["description"] = desc
            user["notes"] = notes
            user["activation text"] = activation_text
            user["preferred weight"] = preferred_weight
            self.write_user_metadata(name, user)

    return QRLoraUserMetadataEditor
