//! How a property of the `codiff` element is declared: [`settings!`] turns
//! the property table of [`super::settings`] (one entry per property) into the
//! `Settings` struct, its `Default`, the property specs and the code that sets
//! and reads each property, and the value kinds below say how each type of
//! value is specified, stored and converted.
use gst::glib;
use gst::prelude::*;

use glib::translate::{FromGlib, IntoGlib};
use glib::value::{FromValue, GenericValueTypeChecker};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One kind of property value: the field type it is stored as in `Settings`,
/// its default, its property spec (with range and default) and the
/// conversions from and to a `glib::Value`.
pub(super) trait Kind {
    /// The type of the field in `Settings`.
    type Value;
    /// The spec builder, to which the table adds nick, blurb and flags.
    type Builder<'a>: gst::prelude::GstParamSpecBuilderExt<'a>;

    fn default_value(&self) -> Self::Value;
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a>;
    /// The field value for a value set; the property system checked its type.
    fn value_to_field(&self, value: &glib::Value) -> Self::Value;
    /// The property value of a field value.
    fn field_to_value(&self, value: &Self::Value) -> glib::Value;
}

/// A `glib::Enum` property with its default.
pub(super) struct Enum<T>(pub(super) T);

impl<T> Kind for Enum<T>
where
    T: Copy
        + StaticType
        + FromGlib<i32>
        + IntoGlib<GlibType = i32>
        + ToValue
        + for<'v> FromValue<'v, Checker = GenericValueTypeChecker<T>>,
{
    type Value = T;
    type Builder<'a> = glib::ParamSpecEnumBuilder<'a, T>;

    fn default_value(&self) -> T {
        self.0
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecEnum::builder_with_default(name, self.0)
    }
    fn value_to_field(&self, value: &glib::Value) -> T {
        value.get().expect("type checked upstream")
    }
    fn field_to_value(&self, value: &T) -> glib::Value {
        value.to_value()
    }
}

/// A boolean property with its default.
pub(super) struct Bool(pub(super) bool);

impl Kind for Bool {
    type Value = bool;
    type Builder<'a> = glib::ParamSpecBooleanBuilder<'a>;

    fn default_value(&self) -> bool {
        self.0
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecBoolean::builder(name).default_value(self.0)
    }
    fn value_to_field(&self, value: &glib::Value) -> bool {
        value.get().expect("type checked upstream")
    }
    fn field_to_value(&self, value: &bool) -> glib::Value {
        value.to_value()
    }
}

/// A `u32` property from 0 to `max`.
pub(super) struct UInt {
    pub(super) max: u32,
    pub(super) default: u32,
}

impl Kind for UInt {
    type Value = u32;
    type Builder<'a> = glib::ParamSpecUIntBuilder<'a>;

    fn default_value(&self) -> u32 {
        self.default
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecUInt::builder(name).maximum(self.max).default_value(self.default)
    }
    fn value_to_field(&self, value: &glib::Value) -> u32 {
        value.get().expect("type checked upstream")
    }
    fn field_to_value(&self, value: &u32) -> glib::Value {
        value.to_value()
    }
}

/// A `u64` property over the whole `u64` range.
pub(super) struct UInt64(pub(super) u64);

impl Kind for UInt64 {
    type Value = u64;
    type Builder<'a> = glib::ParamSpecUInt64Builder<'a>;

    fn default_value(&self) -> u64 {
        self.0
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecUInt64::builder(name).default_value(self.0)
    }
    fn value_to_field(&self, value: &glib::Value) -> u64 {
        value.get().expect("type checked upstream")
    }
    fn field_to_value(&self, value: &u64) -> glib::Value {
        value.to_value()
    }
}

/// An `f64` property from `min` to `max`.
pub(super) struct Double {
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) default: f64,
}

impl Kind for Double {
    type Value = f64;
    type Builder<'a> = glib::ParamSpecDoubleBuilder<'a>;

    fn default_value(&self) -> f64 {
        self.default
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecDouble::builder(name).minimum(self.min).maximum(self.max).default_value(self.default)
    }
    fn value_to_field(&self, value: &glib::Value) -> f64 {
        value.get().expect("type checked upstream")
    }
    fn field_to_value(&self, value: &f64) -> glib::Value {
        value.to_value()
    }
}

/// A file name (string property) with a default: NULL or "" set it back to
/// the default. Any bytes are kept (see [`string_bytes`]); it reads back
/// lossily as UTF-8.
pub(super) struct File(pub(super) &'static str);

impl Kind for File {
    type Value = PathBuf;
    type Builder<'a> = glib::ParamSpecStringBuilder<'a>;

    fn default_value(&self) -> PathBuf {
        PathBuf::from(self.0)
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecString::builder(name).default_value(Some(self.0))
    }
    fn value_to_field(&self, value: &glib::Value) -> PathBuf {
        path(value).unwrap_or_else(|| self.default_value())
    }
    fn field_to_value(&self, value: &PathBuf) -> glib::Value {
        value.to_string_lossy().to_value()
    }
}

/// An optional file name (string property, default NULL): NULL or "" unset it.
pub(super) struct OptionalFile;

impl Kind for OptionalFile {
    type Value = Option<PathBuf>;
    type Builder<'a> = glib::ParamSpecStringBuilder<'a>;

    fn default_value(&self) -> Option<PathBuf> {
        None
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecString::builder(name)
    }
    fn value_to_field(&self, value: &glib::Value) -> Option<PathBuf> {
        path(value)
    }
    fn field_to_value(&self, value: &Option<PathBuf>) -> glib::Value {
        value.as_ref().map(|p| p.to_string_lossy().into_owned()).to_value()
    }
}

/// A string property with a default: NULL sets it back to the default, bytes
/// that are not UTF-8 are replaced (U+FFFD).
pub(super) struct Text(pub(super) &'static str);

impl Kind for Text {
    type Value = String;
    type Builder<'a> = glib::ParamSpecStringBuilder<'a>;

    fn default_value(&self) -> String {
        self.0.to_string()
    }
    fn builder<'a>(&self, name: &'a str) -> Self::Builder<'a> {
        glib::ParamSpecString::builder(name).default_value(Some(self.0))
    }
    fn value_to_field(&self, value: &glib::Value) -> String {
        string_bytes(value).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_else(|| self.default_value())
    }
    fn field_to_value(&self, value: &String) -> glib::Value {
        value.to_value()
    }
}

/// The file name a string `value` sets, or None for NULL and "".
fn path(value: &glib::Value) -> Option<PathBuf> {
    string_bytes(value).filter(|s| !s.is_empty()).map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)))
}

/// The bytes of a string `value` as set, or None for NULL. C and Python
/// applications may set any bytes (Linux file names need not be UTF-8);
/// `Value::get::<String>` would fail on them, and a panic in a property
/// setter aborts the host.
fn string_bytes(value: &glib::Value) -> Option<Vec<u8>> {
    use glib::translate::ToGlibPtr;
    // SAFETY: the property system checked that `value` holds a string
    // (G_TYPE_STRING) before calling the setter; g_value_get_string returns
    // the value's own NUL-terminated buffer or NULL, valid while `value` is
    // borrowed, and it is copied before returning.
    unsafe {
        let ptr = glib::gobject_ffi::g_value_get_string(value.to_glib_none().0);
        (!ptr.is_null()).then(|| std::ffi::CStr::from_ptr(ptr).to_bytes().to_vec())
    }
}

/// Declares the element's properties, one entry each:
///
/// ```text
/// field: Type {
///     name: "property-name",
///     nick: "Nick",
///     blurb: "What it does",
///     kind: UInt { max: 100, default: 0 },  // a `Kind`: range, default, conversions
///     flags: mutable_playing,               // or mutable_ready: a model property
///     check: Settings::some_warnings,       // optional, see below
/// }
/// ```
///
/// and makes of the list:
/// - `struct Settings` with one `field: Type` per entry, and its `Default`
///   (each kind's default);
/// - `param_specs()`: the specs in list order, built by the kind, with the
///   nick, the blurb and the flag;
/// - `Settings::set(value, pspec, min_cave_tile)`: stores the value as the
///   kind converts it, then returns the `check`'s warnings, if any: a
///   `fn(&Settings, Option<usize>) -> Vec<String>` called with the new
///   values and the loaded model's smallest CaVE tile;
/// - `Settings::get(pspec)`: the value as the kind converts it back;
/// - `Settings::take_model_fields(other)`: copies the `mutable_ready` fields.
macro_rules! settings {
    ($(
        $(#[$attr:meta])*
        $field:ident: $ty:ty {
            name: $name:literal,
            nick: $nick:literal,
            blurb: $blurb:literal,
            kind: $kind:expr,
            flags: $flag:ident,
            $(check: $check:expr,)?
        }
    )*) => {
        /// Property values.
        #[derive(Debug, Clone)]
        pub(super) struct Settings {
            $( $(#[$attr])* pub(super) $field: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Self {
                    $( $field: $crate::element::property::Kind::default_value(&$kind), )*
                }
            }
        }

        /// The element's property specs.
        pub(super) fn param_specs() -> &'static [gst::glib::ParamSpec] {
            static PROPERTIES: std::sync::LazyLock<Vec<gst::glib::ParamSpec>> =
                std::sync::LazyLock::new(|| {
                    vec![$(
                        $crate::element::property::Kind::builder(&$kind, $name)
                            .nick($nick)
                            .blurb($blurb)
                            .$flag()
                            .build(),
                    )*]
                });
            PROPERTIES.as_ref()
        }

        impl Settings {
            /// Set the property `pspec` to `value`; returns warnings for the
            /// log. `min_cave_tile` is the loaded model's smallest CaVE tile
            /// (for the checks).
            pub(super) fn set(
                &mut self,
                value: &gst::glib::Value,
                pspec: &gst::glib::ParamSpec,
                min_cave_tile: Option<usize>,
            ) -> Vec<String> {
                let mut warnings = Vec::new();
                match pspec.name() {
                    $( $name => {
                        self.$field = $crate::element::property::Kind::value_to_field(&$kind, value);
                        $( warnings = ($check)(&*self, min_cave_tile); )?
                    } )*
                    other => unimplemented!("property {other}"),
                }
                warnings
            }

            /// The value of property `pspec`.
            pub(super) fn get(&self, pspec: &gst::glib::ParamSpec) -> gst::glib::Value {
                match pspec.name() {
                    $( $name => $crate::element::property::Kind::field_to_value(&$kind, &self.$field), )*
                    other => unimplemented!("property {other}"),
                }
            }

            /// Copy the `mutable_ready` values (model files, device, precision,
            /// threads) of `other`, the pending values set while running.
            pub(super) fn take_model_fields(&mut self, other: &Settings) {
                $( $crate::element::property::settings!(@model_field $flag, self, other, $field); )*
            }
        }
    };
    (@model_field mutable_ready, $to:ident, $from:ident, $field:ident) => {
        $to.$field = $from.$field.clone();
    };
    (@model_field mutable_playing, $to:ident, $from:ident, $field:ident) => {};
}
pub(super) use settings;
