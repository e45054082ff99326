package fraudbench;

import java.util.concurrent.atomic.AtomicBoolean;

import sun.misc.Signal;

/** SIGTERM and SIGINT set a flag (as the worker's handlers set an Event), so main ends cleanly and exits 0. */
final class Signals {
    private Signals() {
    }

    @SuppressWarnings("restriction")
    static AtomicBoolean stopFlag(Runnable... also) {
        AtomicBoolean stop = new AtomicBoolean();
        for (String name : new String[] {"TERM", "INT"}) {
            Signal.handle(new Signal(name), s -> {
                stop.set(true);
                for (Runnable r : also) {
                    r.run();
                }
            });
        }
        return stop;
    }
}
