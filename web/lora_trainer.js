// Frontend extension for comfyui-lora-trainer.
// Listens for the server's messages so the browser never logs "Unknown message type", and refreshes
// every LoRA list when a new LoRA file is written (ComfyUI's lists are otherwise fetched once per page).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const EVENTS = {
  progress: "loratrainer.progress",
  saved: "loratrainer.saved",
};

app.registerExtension({
  name: "comfyui-lora-trainer.core",
  async setup() {
    api.addEventListener(EVENTS.progress, () => {});
    api.addEventListener(EVENTS.saved, async () => {
      if (typeof app.refreshComboInNodes === "function") {
        await app.refreshComboInNodes();
      }
    });
  },
});
