package fraudbench;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;

/**
 * A Kafka Streams application doing the worker's work: schemaless Avro Transaction in, the manifest's features, an
 * ONNX model, the manifest's thresholds, an Avro Verdict out with the same key.
 *
 * <p>Usage: StreamsScorer BOOTSTRAP APPLICATION_ID SOURCE TARGET MODE MANIFEST SCHEMA_DIR STATE_DIR
 * [WARMUP_SOURCE WARMUP_TARGET WARMUP_COUNT], MODE `batched` (a Processor per task buffers up to 1000 records or 5 ms
 * of wall-clock time and scores them in one session.run) or `per-record` (one session.run per record). With a
 * warm-up, a first application (APPLICATION_ID-warmup) scores WARMUP_COUNT records of WARMUP_SOURCE and is closed,
 * so that the JVM has compiled its hot code before the measured one starts. Prints "assigned" once the measured
 * application is RUNNING; exits 0 on SIGTERM.
 *
 * <p>At least once, Streams' way: offsets are committed every 200 ms (the worker's FRAUD_COMMIT_INTERVAL_MS) after
 * the producer is flushed. In batched mode a commit can overtake records still in a buffer (at most 5 ms or 1000
 * records per partition): a crash at that moment would lose them. A benchmark contender, not a product.
 */
public final class StreamsScorer {
    static final int MAX_BATCH = 1000;
    static final Duration LINGER = Duration.ofMillis(5);

    /** Scores records in batches (buffered per task) or one by one, and forwards Avro verdicts. */
    static final class Scorer implements Processor<byte[], byte[], byte[], byte[]> {
        private final Model model;
        private final boolean batched;
        private final AtomicLong scored;
        private final float[] x;
        @SuppressWarnings("unchecked")
        private final Record<byte[], byte[]>[] records = new Record[MAX_BATCH];
        private final GenericRecord[] txns = new GenericRecord[MAX_BATCH];
        private ProcessorContext<byte[], byte[]> context;
        private int n;

        Scorer(Model model, boolean batched, AtomicLong scored) {
            this.model = model;
            this.batched = batched;
            this.scored = scored;
            this.x = new float[MAX_BATCH * model.width];
        }

        @Override
        public void init(ProcessorContext<byte[], byte[]> context) {
            this.context = context;
            if (batched) {
                context.schedule(LINGER, PunctuationType.WALL_CLOCK_TIME, ts -> flush());
            }
        }

        @Override
        public void process(Record<byte[], byte[]> record) {
            GenericRecord txn = model.decode(record.value());
            model.features(txn, x, n);
            records[n] = record;
            txns[n++] = txn;
            if (!batched || n == MAX_BATCH) {
                flush();
            }
        }

        private void flush() {
            if (n == 0) {
                return;
            }
            float[] p = model.score(x, n);
            long now = System.currentTimeMillis();
            for (int i = 0; i < n; i++) {
                context.forward(records[i].withValue(model.verdict(txns[i], p[i], now)));
                records[i] = null;
                txns[i] = null;
            }
            scored.addAndGet(n);
            n = 0;
        }

        @Override
        public void close() {
            flush();
        }
    }

    /** The application: SOURCE → score → TARGET, with the worker's client settings. */
    static KafkaStreams app(String bootstrap, String applicationId, String source, String target, Model model,
                            boolean batched, AtomicLong scored, Path stateDir) throws IOException {
        Topology topology = new Topology();
        topology.addSource("transactions", source);
        topology.addProcessor("score", () -> new Scorer(model, batched, scored), "transactions");
        topology.addSink("verdicts", target, "score");

        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, applicationId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.AT_LEAST_ONCE);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 200);
        p.put(StreamsConfig.STATE_DIR_CONFIG, Files.createDirectories(stateDir).toString());
        p.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
        p.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
        // The worker's consumer and producer settings that apply (see Copy).
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.MAX_POLL_RECORDS_CONFIG), MAX_BATCH);
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG), 10_000);
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG), 1_000);
        Copy.producerConfig(bootstrap, "streams").forEach((k, v) -> {
            String key = (String) k;
            if (!key.endsWith(".serializer") && !key.equals(ProducerConfig.CLIENT_ID_CONFIG)
                    && !key.equals(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG)) {
                p.put(StreamsConfig.producerPrefix(key), v);
            }
        });
        KafkaStreams streams = new KafkaStreams(topology, p);
        streams.setUncaughtExceptionHandler(e -> {
            e.printStackTrace();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        return streams;
    }

    public static void main(String[] args) throws Exception {
        if ((args.length != 8 && args.length != 11) || !(args[4].equals("batched") || args[4].equals("per-record"))) {
            System.err.println("usage: StreamsScorer BOOTSTRAP APPLICATION_ID SOURCE TARGET batched|per-record "
                               + "MANIFEST SCHEMA_DIR STATE_DIR [WARMUP_SOURCE WARMUP_TARGET WARMUP_COUNT]");
            System.exit(2);
        }
        boolean batched = args[4].equals("batched");
        // One stream thread, so one model session; a Processor per task shares it (tasks run on that thread).
        Model model = new Model(Path.of(args[5]), Path.of(args[6]));
        CountDownLatch stopped = new CountDownLatch(1);
        AtomicBoolean stop = Signals.stopFlag(stopped::countDown);
        if (args.length == 11) {
            AtomicLong scored = new AtomicLong();
            long count = Long.parseLong(args[10]);
            KafkaStreams warmup = app(args[0], args[1] + "-warmup", args[8], args[9], model, batched, scored,
                                      Path.of(args[7], "warmup"));
            warmup.start();
            while (scored.get() < count && !stop.get() && warmup.state() != KafkaStreams.State.ERROR
                   && warmup.state() != KafkaStreams.State.PENDING_ERROR) {
                Thread.sleep(10);
            }
            warmup.close(Duration.ofSeconds(60));
        }

        KafkaStreams streams = app(args[0], args[1], args[2], args[3], model, batched, new AtomicLong(),
                                   Path.of(args[7], "app"));
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.RUNNING && before == KafkaStreams.State.REBALANCING) {
                System.out.println("assigned");
                System.out.flush();
            } else if (now == KafkaStreams.State.ERROR) {
                stopped.countDown();
            }
        });
        streams.start();
        stopped.await();
        boolean failed = streams.state() == KafkaStreams.State.ERROR
            || streams.state() == KafkaStreams.State.PENDING_ERROR;
        streams.close(Duration.ofSeconds(60));
        model.close();
        System.exit(failed ? 1 : 0);
    }
}
