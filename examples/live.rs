//! Live video through `codiff`: how far behind the clock the sink renders,
//! frames restored and shown, memory.
//!
//! ```text
//! cargo run --release --example live -- [--size 1280x720] [--fps 30] [--seconds 20]
//! ```
//!
//! Runs `videotestsrc is-live=true pattern=snow ! jpegenc quality=20 ! jpegdec`
//! into `fakesink sync=true` through three arrangements, each with the sink's
//! qos off and on: `codiff` with no queue, `codiff ! queue`, and `queue
//! leaky=downstream max-size-buffers=1 ! codiff ! queue` (the live recipe).
use clap::Parser;

use codiff_testkit::live;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "1280x720")]
    size: String,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Extra codiff properties, e.g. "late-frames=passthrough"
    #[arg(long, default_value = "")]
    props: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    gst::init()?;
    gstcodiff::plugin_register_static()?;
    let (w, h) = a.size.split_once('x').ok_or("size: WxH")?;
    let (w, h): (u32, u32) = (w.parse()?, h.parse()?);
    println!("{w}x{h} at {} fps for {} s, snow at JPEG quality 20", a.fps, a.seconds);
    let leaky = "queue leaky=downstream max-size-buffers=1 ! codiff ! queue";
    for (middle, qos) in [
        ("codiff", false),
        ("codiff", true),
        ("codiff ! queue", false),
        ("codiff ! queue", true),
        (leaky, false),
        (leaky, true),
    ] {
        let middle = middle.replacen("codiff", &format!("codiff {}", a.props), 1);
        let r = live::run_live(w, h, a.fps, a.seconds, &middle, qos);
        println!(
            "{middle:<58} qos={qos:<5}: shown {:>4} of {}, restored {:>3}, restored shown {:>3}, lag last {:.2} s max {:.2} s (latency {:.2} s), RSS {:.0} -> {:.0} MB",
            r.shown,
            a.seconds * a.fps,
            r.restored,
            r.restored_shown,
            r.last_lag,
            r.max_lag,
            r.latency,
            r.rss_start_mb,
            r.rss_end_mb
        );
    }
    Ok(())
}
