//! The tray icon and its menu: an icon and a tooltip per state, the state in words as the
//! menu's first (inert) line, then Start / Stop / Restart (each enabled only when it makes
//! sense), Open Dashboard, Settings…, Open Logs and Quit.

use std::collections::HashMap;

use tauri::image::Image;
use tauri::menu::{Menu, MenuItem, PredefinedMenuItem};
use tauri::tray::{TrayIcon, TrayIconBuilder};
use tauri::{AppHandle, Wry};

use crate::icons::{self, Look};
use crate::state::Shown;

/// The tray icons' size in pixels (StatusNotifier hosts scale it).
const ICON_SIZE: u32 = 32;

/// The menu items' ids, which the menu events carry.
pub mod id {
    pub const STATUS: &str = "status";
    pub const START: &str = "start";
    pub const STOP: &str = "stop";
    pub const RESTART: &str = "restart";
    pub const DASHBOARD: &str = "dashboard";
    pub const SETTINGS: &str = "settings";
    pub const LOGS: &str = "logs";
    pub const QUIT: &str = "quit";
}

pub struct Tray {
    icon: TrayIcon,
    status: MenuItem<Wry>,
    start: MenuItem<Wry>,
    stop: MenuItem<Wry>,
    restart: MenuItem<Wry>,
    images: HashMap<Look, Vec<u8>>,
}

impl Tray {
    /// Builds the tray in the stopped look; `on_item` gets each clicked item's id.
    pub fn build(
        app: &AppHandle,
        on_item: impl Fn(&AppHandle, &str) + Send + Sync + 'static,
    ) -> tauri::Result<Tray> {
        let item = |id: &str, text: &str, enabled: bool| {
            MenuItem::with_id(app, id, text, enabled, None::<&str>)
        };
        let shown = Shown::Absent;
        let actions = shown.actions();
        let status = item(id::STATUS, &shown.tooltip(None), false)?;
        let start = item(id::START, "Start", actions.start)?;
        let stop = item(id::STOP, "Stop", actions.stop)?;
        let restart = item(id::RESTART, "Restart", actions.restart)?;
        let menu = Menu::with_items(
            app,
            &[
                &status,
                &PredefinedMenuItem::separator(app)?,
                &start,
                &stop,
                &restart,
                &PredefinedMenuItem::separator(app)?,
                &item(id::DASHBOARD, "Open Dashboard", true)?,
                &item(id::SETTINGS, "Settings…", true)?,
                &item(id::LOGS, "Open Logs", true)?,
                &PredefinedMenuItem::separator(app)?,
                &item(id::QUIT, "Quit", true)?,
            ],
        )?;
        let images: HashMap<Look, Vec<u8>> = Look::ALL
            .iter()
            .map(|&look| (look, icons::rgba(look, ICON_SIZE)))
            .collect();
        let icon = TrayIconBuilder::with_id("berth")
            .icon(image(&images, shown.look()))
            .tooltip(shown.tooltip(None))
            .menu(&menu)
            .show_menu_on_left_click(true)
            .on_menu_event(move |app, event| on_item(app, event.id().as_ref()))
            .build(app)?;
        Ok(Tray {
            icon,
            status,
            start,
            stop,
            restart,
            images,
        })
    }

    /// Shows `shown`: icon, tooltip, the menu's first line and which actions it offers.
    pub fn show(&self, shown: Shown, reason: Option<&str>) -> tauri::Result<()> {
        let words = shown.tooltip(reason);
        let actions = shown.actions();
        self.icon
            .set_icon(Some(image(&self.images, shown.look())))?;
        self.icon.set_tooltip(Some(&words))?;
        self.status.set_text(&words)?;
        self.start.set_enabled(actions.start)?;
        self.stop.set_enabled(actions.stop)?;
        self.restart.set_enabled(actions.restart)?;
        Ok(())
    }
}

fn image(images: &HashMap<Look, Vec<u8>>, look: Look) -> Image<'_> {
    Image::new(&images[&look], ICON_SIZE, ICON_SIZE)
}
