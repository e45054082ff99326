package fraudbench;

import java.time.Duration;
import java.util.ArrayDeque;
import java.util.Collection;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.CooperativeStickyAssignor;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.Callback;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * The client ceiling: consume raw records and produce the same key and value bytes to another topic, committing an
 * offset only once the producer has acknowledged that record and every earlier one of its partition.
 *
 * <p>Commit policy, the worker's: every poll's records are one batch with a count of outstanding acknowledgements
 * (decremented by the producer's callback); the loop moves the acknowledged batches at the head of the queue into
 * the safe offsets and commits those with commitAsync at most every 200 ms (the worker's FRAUD_COMMIT_INTERVAL_MS).
 * Nothing waits for acknowledgements in the loop; a revocation and SIGTERM flush the producer and commit
 * synchronously.
 *
 * <p>Usage: Copy BOOTSTRAP GROUP SOURCE TARGET [WARMUP_SOURCE WARMUP_TARGET WARMUP_COUNT]. With a warm-up, it first
 * copies WARMUP_COUNT records of WARMUP_SOURCE with clients of their own (group GROUP-warmup) and closes them, so
 * that the JVM has compiled its hot code before it joins GROUP. Prints "assigned N" once it has partitions of
 * SOURCE; exits 0 on SIGTERM, 1 if an output was not acknowledged.
 */
public final class Copy {
    static final long COMMIT_INTERVAL_MS = 200;

    /** One poll's records: outstanding acknowledgements and the next offset of each partition. */
    static final class Batch implements Callback {
        final AtomicInteger left;
        final Map<TopicPartition, Long> next = new HashMap<>();
        volatile Exception failed;

        Batch(ConsumerRecords<byte[], byte[]> records) {
            left = new AtomicInteger(records.count());
            for (ConsumerRecord<byte[], byte[]> r : records) {
                next.merge(new TopicPartition(r.topic(), r.partition()), r.offset() + 1, Math::max);
            }
        }

        @Override
        public void onCompletion(RecordMetadata metadata, Exception exception) {
            if (exception != null) {
                failed = exception;
            }
            left.decrementAndGet();
        }
    }

    /** The producer settings of the worker (worker/kafka.py producer_config) in the Java client's terms. */
    static Properties producerConfig(String bootstrap, String clientId) {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.CLIENT_ID_CONFIG, clientId);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        p.put(ProducerConfig.LINGER_MS_CONFIG, "5");
        p.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        // librdkafka's default batch.size (1,000,000 bytes) instead of the Java client's 16 KiB.
        p.put(ProducerConfig.BATCH_SIZE_CONFIG, "1000000");
        // The worker's queue.buffering.max.kbytes: 64 MiB of unacknowledged output at most.
        p.put(ProducerConfig.BUFFER_MEMORY_CONFIG, String.valueOf(64L << 20));
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        return p;
    }

    /** The consumer settings of the worker (worker/kafka.py consumer_config): manual commits, cooperative-sticky. */
    static Properties consumerConfig(String bootstrap, String group, String clientId) {
        Properties c = new Properties();
        c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        c.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        c.put(ConsumerConfig.CLIENT_ID_CONFIG, clientId);
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        c.put(ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, CooperativeStickyAssignor.class.getName());
        c.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, "10000");
        c.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, "1000");
        // The worker's FRAUD_BATCH_MAX_SIZE.
        c.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, "1000");
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        return c;
    }

    private final KafkaProducer<byte[], byte[]> producer;
    private final KafkaConsumer<byte[], byte[]> consumer;
    private final String target;
    private final ArrayDeque<Batch> pending = new ArrayDeque<>();
    private final Map<TopicPartition, OffsetAndMetadata> safe = new HashMap<>();
    private boolean dirty;

    Copy(String bootstrap, String group, String target) {
        this.target = target;
        String id = "java-copy-" + group;
        producer = new KafkaProducer<>(producerConfig(bootstrap, id));
        consumer = new KafkaConsumer<>(consumerConfig(bootstrap, group, id));
    }

    /** Move the acknowledged batches at the head of the queue into the safe offsets; throw on a failed output. */
    private void settle() {
        while (!pending.isEmpty() && pending.peekFirst().left.get() == 0) {
            Batch b = pending.pollFirst();
            if (b.failed != null) {
                throw new IllegalStateException("output not acknowledged: " + b.failed, b.failed);
            }
            b.next.forEach((tp, o) -> safe.put(tp, new OffsetAndMetadata(o)));
            dirty = true;
        }
    }

    /** Flush the producer and commit every safe offset of `parts` (all of them when null) synchronously. */
    private void commitNow(Collection<TopicPartition> parts) {
        producer.flush();
        settle();
        Map<TopicPartition, OffsetAndMetadata> offsets = new HashMap<>(safe);
        if (parts != null) {
            offsets.keySet().retainAll(parts);
        }
        if (!offsets.isEmpty()) {
            consumer.commitSync(offsets);
        }
    }

    /** Copy until `stop` is set, or until `limit` records are copied and acknowledged (0: no limit). */
    int run(String source, AtomicBoolean stop, long limit) {
        AtomicBoolean announced = new AtomicBoolean(limit > 0);
        long copied = 0;
        consumer.subscribe(List.of(source), new ConsumerRebalanceListener() {
            @Override
            public void onPartitionsRevoked(Collection<TopicPartition> parts) {
                commitNow(parts);
                safe.keySet().removeAll(parts);
            }

            @Override
            public void onPartitionsAssigned(Collection<TopicPartition> parts) {
                if (!parts.isEmpty() && !announced.getAndSet(true)) {
                    System.out.println("assigned " + parts.size());
                    System.out.flush();
                }
            }
        });
        long lastCommit = System.nanoTime();
        try {
            while (!stop.get() && (limit == 0 || copied < limit || !pending.isEmpty())) {
                ConsumerRecords<byte[], byte[]> records = consumer.poll(Duration.ofMillis(limit == 0 ? 500 : 10));
                copied += records.count();
                if (!records.isEmpty()) {
                    Batch batch = new Batch(records);
                    pending.addLast(batch);
                    for (ConsumerRecord<byte[], byte[]> r : records) {
                        producer.send(new ProducerRecord<>(target, null, r.key(), r.value()), batch);
                    }
                }
                settle();
                long now = System.nanoTime();
                if (dirty && now - lastCommit >= COMMIT_INTERVAL_MS * 1_000_000) {
                    consumer.commitAsync(new HashMap<>(safe), null);
                    dirty = false;
                    lastCommit = now;
                }
            }
            commitNow(null);
            return 0;
        } catch (IllegalStateException | KafkaException e) {  // a failed output, also when found in a rebalance
            System.out.println("copy failed: " + e);
            return 1;
        } finally {
            consumer.close(Duration.ofSeconds(30));
            producer.close(Duration.ofSeconds(30));
        }
    }

    public static void main(String[] args) {
        if (args.length != 4 && args.length != 7) {
            System.err.println("usage: Copy BOOTSTRAP GROUP SOURCE TARGET [WARMUP_SOURCE WARMUP_TARGET WARMUP_COUNT]");
            System.exit(2);
        }
        AtomicBoolean stop = Signals.stopFlag();
        if (args.length == 7) {
            new Copy(args[0], args[1] + "-warmup", args[5]).run(args[4], stop, Long.parseLong(args[6]));
        }
        System.exit(new Copy(args[0], args[1], args[3]).run(args[2], stop, 0));
    }
}
